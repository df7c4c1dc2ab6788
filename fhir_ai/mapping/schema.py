"""Marshmallow schemas for mapping files (mappings/<model>.yaml|toml): what an integrator may write."""
from __future__ import annotations

import re
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema, RAISE

from . import units

OBSERVATION_STATUSES = ["registered", "preliminary", "final", "amended", "corrected",
                        "cancelled", "entered-in-error", "unknown"]
AGGREGATES = ["last", "first", "min", "max", "mean", "median", "std", "count", "sum", "slope", "delta", "any"]
VALUE_TYPES = ["quantity", "boolean", "coding", "integer"]
ELEMENTS = {
    "Patient": ["age", "gender"],
    "Encounter": ["serviceType", "class", "type", "modeOfArrival", "reasonText", "serviceProvider"],
}
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(s|min|h|d)\s*$")
_SECONDS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'48h' → 172800.0 seconds; '-30min' → -1800.0."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 48h, 30min, 7d)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


class Duration(fields.Field):
    """A duration such as 48h; kept as text, checked here."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        try:
            parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        return str(value)


class UcumUnit(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if units.normalise_unit(text) is None:
            raise ValidationError(f"unknown unit {text!r}: use a UCUM code fhir_ai knows "
                                  "(see fhir_ai/mapping/units.py) or add an alias")
        return text


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class CodeSchema(_Strict):
    system = fields.String(required=True, validate=validate.Length(min=1))
    code = fields.String(required=True, validate=validate.Length(min=1))
    display = fields.String()


class WindowSchema(_Strict):
    start = fields.String(load_default="-48h")   # a negative duration, "encounter" or "unbounded"
    end = Duration(load_default="0h")

    @validates_schema
    def _check(self, data: dict, **kwargs: Any) -> None:
        start = data.get("start")
        if start not in ("encounter", "unbounded"):
            try:
                seconds = parse_duration(start)
            except ValueError as exc:
                raise ValidationError({"start": [f"{exc}, 'encounter' or 'unbounded'"]}) from exc
            if seconds >= parse_duration(data.get("end", "0h")):
                raise ValidationError({"start": ["must lie before end"]})
        if parse_duration(data.get("end", "0h")) > 0:
            raise ValidationError({"end": ["must not lie after the as-of time (use 0h or a negative duration)"]})


class CategorySchema(_Strict):
    label = fields.String(required=True)
    label_ko = fields.String()
    keywords = fields.List(fields.String(validate=validate.Length(min=1)), required=True,
                           validate=validate.Length(min=1))


class InputSchema(_Strict):
    resource = fields.String(required=True, validate=validate.OneOf(["Observation", "Patient", "Encounter"]))
    label = fields.String(required=True)
    label_ko = fields.String()
    codes = fields.List(fields.Nested(CodeSchema))
    panel_codes = fields.List(fields.Nested(CodeSchema), load_default=list)
    value = fields.String(load_default="quantity", validate=validate.OneOf(VALUE_TYPES))
    unit = UcumUnit()
    molar_mass = fields.Float(validate=validate.Range(min=0, min_inclusive=False))
    unit_aliases = fields.Dict(keys=fields.String(), values=UcumUnit(), load_default=dict)
    plausible = fields.List(fields.Float(allow_nan=False), validate=validate.Length(equal=2))
    statuses = fields.List(fields.String(validate=validate.OneOf(OBSERVATION_STATUSES)),
                           validate=validate.Length(min=1))
    values = fields.Dict(keys=fields.String(), values=fields.Float(allow_nan=False))
    element = fields.String()
    categories = fields.Dict(keys=fields.String(validate=validate.Regexp(
                                 r"^[a-z0-9_]+$", error="use lower-case letters, digits and _")),
                             values=fields.Nested(CategorySchema))

    @validates_schema
    def _check(self, data: dict, **kwargs: Any) -> None:
        resource = data.get("resource")
        errors: dict[str, list[str]] = {}
        if resource == "Observation":
            if not data.get("codes"):
                errors["codes"] = ["an Observation input needs at least one code"]
            if data.get("value", "quantity") == "quantity" and not data.get("unit"):
                errors["unit"] = ["a quantity input needs its expected UCUM unit"]
            if data.get("value") == "coding" and not data.get("values"):
                errors["values"] = ["a coding input needs 'values' (code or system|code → number)"]
            if "element" in data:
                errors["element"] = ["only Patient and Encounter inputs take an element"]
        elif resource in ELEMENTS:
            element = data.get("element")
            if element not in ELEMENTS[resource]:
                errors["element"] = [f"must be one of {ELEMENTS[resource]}"]
            if element in ("gender", "serviceType", "class", "type", "modeOfArrival", "serviceProvider") \
                    and not data.get("values"):
                errors["values"] = [f"element {element!r} needs 'values' (code → number)"]
            if element == "reasonText" and not data.get("categories"):
                errors["categories"] = ["a free-text input needs categories with keywords"]
        plausible = data.get("plausible")
        if plausible and plausible[0] >= plausible[1]:
            errors["plausible"] = ["must be [low, high] with low < high"]
        if errors:
            raise ValidationError(errors)


class FeatureSchema(_Strict):
    name = fields.String(validate=validate.Regexp(r"^[A-Za-z0-9_]+$"))
    input = fields.String(required=True)
    aggregate = fields.String(validate=validate.OneOf(AGGREGATES))
    aggregates = fields.List(fields.String(validate=validate.OneOf(AGGREGATES)), validate=validate.Length(min=1))
    category = fields.String()
    window = fields.Nested(WindowSchema)

    @validates_schema
    def _check(self, data: dict, **kwargs: Any) -> None:
        if "aggregate" in data and "aggregates" in data:
            raise ValidationError({"aggregates": ["give either aggregate or aggregates, not both"]})
        if "name" in data and "aggregates" in data and len(data["aggregates"]) > 1:
            raise ValidationError({"name": ["a name fits a single aggregate only"]})


class ScoringSchema(_Strict):
    core_inputs = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    min_core_inputs = fields.Integer(required=True, validate=validate.Range(min=1))
    # Encounter.class codes (v3 ActCode, e.g. EMER) of the visits the model is for; absent: any visit.
    # A patient whose current encounter is of another class (or has none) is not assessed, and told why.
    encounter_classes = fields.List(fields.String(validate=validate.Regexp(r"^[A-Za-z0-9_.-]{1,32}$")),
                                    validate=validate.Length(min=1))


class News2Schema(_Strict):
    window = Duration(load_default="24h")
    inputs = fields.Dict(
        keys=fields.String(validate=validate.OneOf(
            ["resp_rate", "spo2", "fio2", "systolic_bp", "pulse", "gcs", "avpu", "temperature"])),
        values=fields.String(), required=True)


class SecondReaderSchema(_Strict):
    """The clinician's own rating (e.g. the nurse's KTAS level): never a model input, only compared with it."""
    input = fields.String(required=True)
    window = fields.Nested(WindowSchema, load_default=lambda: {"start": "encounter", "end": "0h"})


class DefaultsSchema(_Strict):
    statuses = fields.List(fields.String(validate=validate.OneOf(OBSERVATION_STATUSES)),
                           load_default=lambda: ["final", "amended", "corrected"])
    window = fields.Nested(WindowSchema, load_default=dict)


class MappingSchema(_Strict):
    model = fields.String(required=True, validate=validate.Regexp(r"^[a-z][a-z0-9-]*$"))
    version = fields.String(required=True)
    description = fields.String()
    defaults = fields.Nested(DefaultsSchema, load_default=dict)
    inputs = fields.Dict(keys=fields.String(validate=validate.Regexp(
                             r"^[a-z][a-z0-9_]*$",
                             error="use lower-case letters, digits and _, starting with a letter")),
                         values=fields.Nested(InputSchema), required=True,
                         validate=validate.Length(min=1))
    features = fields.List(fields.Nested(FeatureSchema), required=True, validate=validate.Length(min=1))
    scoring = fields.Nested(ScoringSchema, required=True)
    news2 = fields.Nested(News2Schema)
    second_reader = fields.Nested(SecondReaderSchema)

    @validates_schema
    def _references(self, data: dict, **kwargs: Any) -> None:
        inputs = data.get("inputs") or {}
        errors: dict[str, Any] = {}
        for i, feature in enumerate(data.get("features") or []):
            name = feature.get("input")
            if name not in inputs:
                errors.setdefault("features", {})[i] = {"input": [f"no input named {name!r}"]}
                continue
            spec = inputs[name]
            static = spec.get("resource") != "Observation"
            if static and (feature.get("aggregate") or feature.get("aggregates") or feature.get("window")):
                errors.setdefault("features", {})[i] = {
                    "aggregate": [f"{spec['resource']} input {name!r} is a single value: no aggregate or window"]}
            if not static and not (feature.get("aggregate") or feature.get("aggregates")):
                errors.setdefault("features", {})[i] = {"aggregate": ["an Observation feature needs an aggregate"]}
            category = feature.get("category")
            if category is not None and category not in (spec.get("categories") or {}):
                errors.setdefault("features", {})[i] = {"category": [f"input {name!r} has no category {category!r}"]}
        scoring = data.get("scoring") or {}
        for j, name in enumerate(scoring.get("core_inputs") or []):
            if name not in inputs:
                errors.setdefault("scoring", {}).setdefault("core_inputs", {})[j] = [f"no input named {name!r}"]
        if scoring.get("min_core_inputs", 0) > len(scoring.get("core_inputs") or []):
            errors.setdefault("scoring", {})["min_core_inputs"] = ["larger than the number of core inputs"]
        for param, name in ((data.get("news2") or {}).get("inputs") or {}).items():
            if name not in inputs:
                errors.setdefault("news2", {}).setdefault("inputs", {})[param] = [f"no input named {name!r}"]
        reader = data.get("second_reader")
        if reader:
            name = reader.get("input")
            if name not in inputs:
                errors.setdefault("second_reader", {})["input"] = [f"no input named {name!r}"]
            elif any(f.get("input") == name for f in data.get("features") or []):
                errors.setdefault("second_reader", {})["input"] = [
                    f"input {name!r} is also a model feature; the model must not see the rating it checks"]
        if errors:
            raise ValidationError(errors)
