"""Load and check mapping files; compile them into the structures feature extraction uses."""
from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from marshmallow import Schema, ValidationError, fields

from ..errors import MappingError
from . import units
from .schema import MappingSchema, parse_duration

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".toml")
AGGREGATE_WORDS = {
    "last": "latest", "first": "first", "min": "lowest", "max": "highest", "mean": "mean",
    "median": "median", "std": "variability", "count": "number of measurements", "sum": "total",
    "slope": "trend per hour",
    "delta": "change", "any": "any",
}


@dataclass(frozen=True)
class Input:
    """One source of values: Observations with these codes, or a Patient / Encounter element."""
    name: str
    index: int
    resource: str
    label: str
    label_ko: str | None
    codes: tuple[tuple[str, str], ...]
    panel_codes: tuple[tuple[str, str], ...]
    value_type: str
    unit: str | None
    molar_mass: float | None
    unit_aliases: dict[str, str]
    plausible: tuple[float, float] | None
    statuses: frozenset[str]
    values: dict[str, float]
    element: str | None
    categories: dict[str, dict[str, Any]]

    @property
    def is_observation(self) -> bool:
        return self.resource == "Observation"

    def unit_conversion(self, code: str | None, text: str | None) -> tuple[float, float] | None:
        """(scale, offset) into this input's unit for a Quantity's code/unit text, or None."""
        target = units.normalise_unit(self.unit)
        source = None
        for candidate in (code, text):
            if candidate and candidate in self.unit_aliases:
                source = units.normalise_unit(self.unit_aliases[candidate])
                break
        if source is None:
            source = units.normalise_unit(code, text)
        if source is None or target is None:
            return None
        return units.conversion(source, target, self.molar_mass)

    def coded_value(self, system: str | None, code: str | None) -> float | None:
        if code is None:
            return None
        if system and f"{system}|{code}" in self.values:
            return self.values[f"{system}|{code}"]
        return self.values.get(code)


@dataclass(frozen=True)
class Feature:
    """One model column: an input, an aggregate over a window relative to the as-of time."""
    name: str
    input: str
    aggregate: str | None
    window_start: float | str | None     # seconds (negative), "encounter", "unbounded", None for static inputs
    window_end: float | None
    category: str | None
    label: str


@dataclass
class Mapping:
    """A validated, compiled mapping file."""
    model: str
    version: str
    path: Path
    digest: str
    inputs: dict[str, Input]
    features: list[Feature]
    core_inputs: list[str]
    min_core_inputs: int
    news2: dict[str, Any] | None
    second_reader: dict[str, Any] | None = None
    description: str = ""
    code_index: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    encounter_classes: tuple[str, ...] = ()     # the visits the model is for (Encounter.class); () = any

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def feature_units(self) -> dict[str, str | None]:
        """{input: its UCUM unit, None for a value without one} for every input a feature reads: the
        numbers a model trained on this mapping sees (values are converted into the input's unit)."""
        used = {f.input for f in self.features}
        return {spec.name: spec.unit for spec in self.input_list if spec.name in used}

    @property
    def input_list(self) -> list[Input]:
        return sorted(self.inputs.values(), key=lambda i: i.index)

    # query_codes() and longest_lookback() are worked out once per Mapping (it does not change once
    # loaded; a reload makes a new one): every single-patient request asks for both.
    def query_codes(self) -> list[tuple[str, str]]:
        """Every Observation code worth asking the hospital for (including panels)."""
        return list(self._query_codes)

    @cached_property
    def _query_codes(self) -> tuple[tuple[str, str], ...]:
        seen: dict[tuple[str, str], None] = {}
        for spec in self.input_list:
            for code in (*spec.codes, *spec.panel_codes):
                seen[code] = None
        return tuple(seen)

    def longest_lookback(self) -> float | None:
        """Seconds before as-of that any feature reads, None if some feature is unbounded."""
        return self._longest_lookback

    @cached_property
    def _longest_lookback(self) -> float | None:
        spans = []
        for f in self.features:
            if f.window_start is None:
                continue
            if isinstance(f.window_start, str):
                return None
            spans.append(-f.window_start)
        if self.news2:
            spans.append(self.news2["window"])
        return max(spans) if spans else 0.0


def read_file(path: Path) -> Any:
    text = path.read_bytes()
    if path.suffix == ".toml":
        return tomllib.loads(text.decode("utf-8"))
    return yaml.safe_load(text)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _flatten(messages: Any, field: fields.Field | Schema | None, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict → {'inputs.heart_rate.unit': [...]}: the YAML path of each problem.

    Walked alongside the schema: marshmallow puts a ``fields.Dict`` entry's errors under a ``key`` or
    ``value`` segment that is not in the file ('inputs.heart_rate.value.unit'), and an input may itself
    be named ``value``, so the segment cannot be told apart by its text.
    """
    if not isinstance(messages, dict):
        texts = [str(m) for m in messages] if isinstance(messages, list) else [str(messages)]
        return {prefix or "(file)": texts}
    if isinstance(field, fields.Nested):
        field = field.schema
    out: dict[str, list[str]] = {}
    for key, value in messages.items():
        path = _join(prefix, key)
        if key == "_schema":
            found = _flatten(value, None, prefix)
        elif isinstance(field, Schema):
            found = _flatten(value, field.fields.get(str(key)), path)
        elif isinstance(field, fields.List):
            found = _flatten(value, field.inner, path)
        elif isinstance(field, fields.Dict) and isinstance(value, dict) and value and set(value) <= {"key", "value"}:
            found = {}
            if "key" in value:          # the entry's name itself is wrong
                found[path] = [f"name {key!r}: {m}" for m in _flatten(value["key"], None, path)[path]]
            for where, msgs in _flatten(value.get("value", {}), field.value_field, path).items():
                found.setdefault(where, []).extend(msgs)
        else:                           # a schema's own check, keyed as in the file
            found = _flatten(value, None, path)
        for where, msgs in found.items():
            out.setdefault(where, []).extend(msgs)
    return out


def validate_document(document: Any, path: Path) -> tuple[dict | None, dict[str, list[str]]]:
    """(validated data, problems keyed 'file: field.path')."""
    if not isinstance(document, dict):
        return None, {f"{path}: (file)": ["a mapping file must hold a table/dictionary at its top"]}
    schema = MappingSchema()
    try:
        data = schema.load(document)
    except ValidationError as exc:
        return None, {f"{path}: {where}": msgs for where, msgs in _flatten(exc.messages, schema).items()}
    return data, {}


def _codes(items: list[dict] | None) -> tuple[tuple[str, str], ...]:
    return tuple((c["system"], c["code"]) for c in items or [])


def compile_mapping(data: dict, path: Path, digest: str) -> Mapping:
    default_statuses = data["defaults"]["statuses"]
    default_window = data["defaults"]["window"]
    inputs: dict[str, Input] = {}
    for index, (name, spec) in enumerate(data["inputs"].items()):
        plausible = spec.get("plausible")
        inputs[name] = Input(
            name=name, index=index, resource=spec["resource"], label=spec["label"],
            label_ko=spec.get("label_ko"), codes=_codes(spec.get("codes")),
            panel_codes=_codes(spec.get("panel_codes")), value_type=spec["value"],
            unit=spec.get("unit"), molar_mass=spec.get("molar_mass"),
            unit_aliases=dict(spec.get("unit_aliases") or {}),
            plausible=(plausible[0], plausible[1]) if plausible else None,
            statuses=frozenset(spec.get("statuses") or default_statuses),
            values=dict(spec.get("values") or {}), element=spec.get("element"),
            categories=dict(spec.get("categories") or {}))
    features: list[Feature] = []
    for item in data["features"]:
        spec = inputs[item["input"]]
        if not spec.is_observation:
            categories = [item["category"]] if item.get("category") else list(spec.categories) or [None]
            for category in categories:
                name = item.get("name") if len(categories) == 1 and item.get("name") else (
                    f"{spec.name}_{category}" if category else spec.name)
                label = spec.categories[category]["label"] if category else spec.label
                features.append(Feature(name, spec.name, None, None, None, category, label))
            continue
        window = item.get("window") or default_window
        start = window["start"]
        start_value: float | str = start if start in ("encounter", "unbounded") else parse_duration(start)
        end_value = parse_duration(window["end"])
        for aggregate in item.get("aggregates") or [item["aggregate"]]:
            name = item.get("name") or f"{spec.name}_{aggregate}"
            label = f"{spec.label} ({AGGREGATE_WORDS[aggregate]})"
            features.append(Feature(name, spec.name, aggregate, start_value, end_value, None, label))
    news2 = None
    if data.get("news2"):
        news2 = {"window": parse_duration(data["news2"]["window"]), "inputs": dict(data["news2"]["inputs"])}
    second_reader = None
    if data.get("second_reader"):
        window = data["second_reader"]["window"]
        start = window["start"]
        second_reader = {"input": data["second_reader"]["input"],
                         "start": start if start in ("encounter", "unbounded") else parse_duration(start),
                         "end": parse_duration(window["end"])}
    mapping = Mapping(model=data["model"], version=data["version"], path=path, digest=digest,
                      inputs=inputs, features=features, core_inputs=list(data["scoring"]["core_inputs"]),
                      min_core_inputs=data["scoring"]["min_core_inputs"], news2=news2,
                      second_reader=second_reader, description=data.get("description", ""),
                      encounter_classes=tuple(data["scoring"].get("encounter_classes") or ()))
    for spec in mapping.input_list:
        # Panel codes are only asked for; values are matched on the codes of the panel's components.
        for code in spec.codes:
            mapping.code_index.setdefault(code, []).append(spec.index)
    return mapping


def _duplicates(mapping: Mapping, path: Path) -> dict[str, list[str]]:
    seen: dict[str, int] = {}
    problems: dict[str, list[str]] = {}
    for i, feature in enumerate(mapping.features):
        if feature.name in seen:
            problems[f"{path}: features.{i}.name"] = [
                f"feature name {feature.name!r} repeats features entry {seen[feature.name]}"]
        seen.setdefault(feature.name, i)
    return problems


def load_mapping(path: Path | str) -> Mapping:
    """Read, validate and compile one mapping file; MappingError lists every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        document = read_file(path)
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MappingError({f"{path}: (file)": [f"cannot read: {exc}"]}) from exc
    data, problems = validate_document(document, path)
    if problems:
        raise MappingError(problems)
    mapping = compile_mapping(data, path, hashlib.sha256(raw).hexdigest())
    problems = _duplicates(mapping, path)
    if path.stem != mapping.model:
        problems[f"{path}: model"] = [f"model {mapping.model!r} does not match the file name {path.name!r}"]
    if problems:
        raise MappingError(problems)
    return mapping


def mapping_files(directory: Path | str) -> list[Path]:
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())


def check_directory(directory: Path | str) -> tuple[dict[str, Mapping], dict[str, list[str]]]:
    """Every mapping in a folder, and every problem found (keyed 'file: field.path')."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}, {f"{directory}: (folder)": ["no such folder"]}
    mappings: dict[str, Mapping] = {}
    problems: dict[str, list[str]] = {}
    for path in mapping_files(directory):
        try:
            mapping = load_mapping(path)
        except MappingError as exc:
            problems.update(exc.problems)
            continue
        if mapping.model in mappings:
            problems[f"{path}: model"] = [f"model {mapping.model!r} is already mapped by "
                                          f"{mappings[mapping.model].path.name}"]
            continue
        mappings[mapping.model] = mapping
    return mappings, problems


def load_directory(directory: Path | str) -> dict[str, Mapping]:
    mappings, problems = check_directory(directory)
    if problems:
        raise MappingError(problems)
    return mappings
