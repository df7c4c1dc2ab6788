"""Exact path-dependent TreeSHAP for LightGBM models: LightGBM's pred_contrib for one row in ~0.05 ms.

LightGBM's ``predict(pred_contrib=True)`` runs Lundberg's recursive TreeSHAP (src/io/tree.cpp ``TreeSHAP``)
for every tree, every time. The result is a sum over leaves (the GPUTreeShap decomposition): merge a
leaf's root-to-leaf path by feature; feature i gets a zero fraction z_i (the product of child count /
node count over its nodes) and a one fraction o_i, 1 iff the row follows the path at every node of
feature i. The leaf adds leaf_value * (o_i - z_i) * (unwound path weight of i) to feature i. Only the
o's depend on the row and they are bits, so each leaf's contributions are a function of a d-bit
pattern, tabulated for all 2^d patterns at load. Leaves are then gathered into groups (a subtree's
leaves, or one leaf) whose summed contributions are tabulated per pattern of the group's bits, so
serving a row is node decisions, one table row per group, one gather and one sum per feature.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)

# LightGBM's kZeroThreshold is the float literal 1e-35f held in a double (include/LightGBM/meta.h).
K_ZERO_THRESHOLD = float(np.float32(1e-35))
MISSING_TYPES = {"None": 0, "Zero": 1, "NaN": 2}
# What each of _values' five copies of x holds where the row is missing (a column per copy).
MISSING_READ = np.array([[-np.inf], [np.nan], [0.0], [-np.inf], [np.nan]])
MISSING_READ.flags.writeable = False
# The most the per-leaf tables (sum of 2^d * d float64 over leaves) may take while they are built; a
# bigger model is explained by LightGBM's pred_contrib instead (refused before anything is allocated).
BUILD_BUDGET_BYTES = 256 * 2**20
# (leaf, pattern) rows per block of the table computation; bounds the temporaries to a few MB.
BLOCK_ROWS = 1 << 15
# A group's table is indexed by at most this many bits (2^bits rows).
GROUP_BITS = 16
# Grouping minimises elements served + GROUP_COST per group + MEMORY_WEIGHT per table entry: 1e-3 gives
# the deterioration model ~24 MB and ~7,700 elements a row (1e-4: ~75 MB and ~6,400, barely faster).
GROUP_COST = 1.0
MEMORY_WEIGHT = 1e-3


class TreeExplainer:
    """Tabulated TreeSHAP for one Booster; ``contributions`` equals ``predict(X, pred_contrib=True)``.

    Serving one row: every node's decision at once (nodes laid out 8 * chunks per tree), packed to
    bytes; each group's table row from one look-up per byte of its tree (added up); each (group,
    feature) element's table value; elements sorted by (class, feature), so one reduceat sums them.
    """

    def __init__(self, num_features: int, num_class: int, arrays: dict[str, np.ndarray]) -> None:
        self.num_features = num_features
        self.num_class = num_class
        self._width = num_class * (num_features + 1)
        source = arrays["node_source"]
        self._has_zero = bool(((source >= 3 * num_features) & (source < 5 * num_features)).any())
        for name, array in arrays.items():
            setattr(self, "_" + name, array)

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> "TreeExplainer":
        started = time.perf_counter()
        model = booster.dump_model()
        if model.get("average_output"):
            raise NotImplementedError("random-forest models (average_output) are not supported")
        if any(tree.get("is_linear") or _has_linear_leaves(tree["tree_structure"]) for tree in model["tree_info"]):
            raise NotImplementedError("linear trees (leaf coefficients) are not supported")
        explainer = _build(model)
        log.info("TreeSHAP table for %d trees: %.1f MB in %.2f s", len(model["tree_info"]),
                 explainer.nbytes / 1e6, time.perf_counter() - started)
        return explainer

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    def row(self, x: np.ndarray) -> np.ndarray:
        """Contributions of one row (1-D, NaN = missing): (F + 1,) for one class, else (classes, F + 1)."""
        values = self._values(np.asarray(x, dtype=np.float64))
        left = values.take(self._node_source) <= self._node_threshold
        # a tree's node slots are whole bytes, so packing the flat array gives each tree its bytes
        lookup = self._lut.take(self._lut_base + np.packbits(left, bitorder="little").take(self._lut_byte))
        groups = self._lut_base.size // self._chunk_count.size
        row = lookup[:groups]                   # each group's row offset in its table: a sum over chunks
        for chunk in range(1, self._chunk_count.size):
            row = row + lookup[chunk * groups:(chunk + 1) * groups]
        out = self._bias.copy()
        if self._key_start.size:                # elements are sorted by key: a sum per run of one key
            weights = self._table.take(row.take(self._elem_group) + self._elem_offset)
            out[self._key] += np.add.reduceat(weights, self._key_start)
        return out if self.num_class == 1 else out.reshape(self.num_class, self.num_features + 1)

    def _values(self, x: np.ndarray) -> np.ndarray:
        """x five times over, NaN replaced as each kind of node reads it (tree.h NumericalDecision),
        then NaN for padding nodes. -inf always goes left and NaN never does (even against an infinite
        threshold): missing_type NaN sends NaN left (-inf) or right (NaN); None reads NaN as 0.0; Zero
        sends NaN and |x| <= kZeroThreshold left (-inf) or right (NaN)."""
        f = self.num_features
        out = np.empty(5 * f + 1)
        kinds = 5 if self._has_zero else 3     # without Zero nodes the last two copies are never read
        view = out[:kinds * f].reshape(kinds, f)
        view[...] = x
        # LightGBM's C API reads a dense row as sparse pairs, keeping only |x| > kZeroThreshold or NaN
        # (c_api.cpp RowFunctionFromDenseMatric): 1e-36 is predicted as 0.0
        np.copyto(view, 0.0, where=np.abs(x) <= K_ZERO_THRESHOLD)
        missing = np.isnan(x)
        if self._has_zero:
            np.copyto(view[3:], MISSING_READ[3:], where=missing | (view[1] == 0.0))
        np.copyto(view[:3], MISSING_READ[:3], where=missing)
        out[5 * f] = np.nan
        return out

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """(n, F + 1), or (n, classes * (F + 1)) for multiclass, laid out as LightGBM's pred_contrib."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.num_features:
            raise ValueError(f"expected rows of {self.num_features} features, got shape {X.shape}")
        out = np.empty((X.shape[0], self._width))
        for i, x in enumerate(X):
            out[i] = self.row(x).reshape(-1)
        return out


def _build(model: dict[str, Any]) -> TreeExplainer:
    num_features = model["max_feature_idx"] + 1
    num_class = model["num_tree_per_iteration"]
    width = num_features + 1
    bias = np.zeros(num_class * width)
    trees = []
    for tree in model["tree_info"]:
        klass = tree["tree_index"] % num_class
        root = tree["tree_structure"]
        if "leaf_value" in root:                # a one-leaf tree only shifts the expected value
            bias[klass * width + num_features] += root["leaf_value"]
            continue
        nodes: list[dict[str, Any]] = []
        tree_leaves = _walk(root, nodes)
        if max(len(path) for *_, path in tree_leaves) > 8 * GROUP_BITS:      # spares _groups' recursion
            raise NotImplementedError(f"a leaf with more than {GROUP_BITS} (feature, chunk) pairs on its path")
        total = root["internal_count"]
        bias[klass * width + num_features] += sum(
            count / total * value for _, value, count, _ in sorted(tree_leaves, key=lambda leaf: leaf[0]))
        trees.append((klass, nodes, _groups(root)))
    arrays = _node_arrays(trees, num_features)
    arrays.update(_group_arrays(trees, width, arrays["chunk_count"]))
    arrays["bias"] = bias
    return TreeExplainer(num_features, num_class, arrays)


def _walk(root: dict[str, Any], nodes: list[dict[str, Any]]) -> list[tuple[int, float, int, list]]:
    """Every leaf of a tree as (leaf index, value, count, path); a path is [(node, feature, left, z)]
    root first, node being the split_index. Internal nodes are appended to ``nodes``."""
    found = []
    stack: list[tuple[dict[str, Any], list]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if "leaf_value" in node:
            found.append((node["leaf_index"], node["leaf_value"], node["leaf_count"], path))
            continue
        if node["decision_type"] != "<=":
            raise NotImplementedError(f"categorical split on feature {node['split_feature']}")
        nodes.append(node)
        count = node["internal_count"]
        for child, left in ((node["left_child"], True), (node["right_child"], False)):
            child_count = child["leaf_count"] if "leaf_value" in child else child["internal_count"]
            stack.append((child, path + [(node["split_index"], node["split_feature"], left, child_count / count)]))
    return found


def _groups(root: dict[str, Any]) -> list[tuple[list[int], list]]:
    """A tree's leaves split into groups, each (nodes, leaves): a subtree's leaves with the subtree's
    and its ancestors' nodes, indexed by their decisions (_node_group), or one leaf with no nodes,
    indexed by mismatch bits per feature and chunk (_leaf_group); at most GROUP_BITS bits either way.
    Chosen to minimise elements served + GROUP_COST per group + MEMORY_WEIGHT per table entry."""
    def best(node: dict[str, Any], path: list) -> tuple[float, list]:
        if "leaf_value" in node:
            leaf = (node["leaf_index"], node["leaf_value"], node["leaf_count"], path)
            d = len({feature for _, feature, _, _ in path})
            bits = len({(feature, n // 8) for n, feature, _, _ in path})
            if bits > GROUP_BITS:             # then its path is also too long for a group of nodes
                raise NotImplementedError(f"a leaf with more than {GROUP_BITS} (feature, chunk) pairs on its path")
            return d + GROUP_COST + MEMORY_WEIGHT * (d << bits), [([], [leaf])]
        count = node["internal_count"]
        split = []
        for child, left in ((node["left_child"], True), (node["right_child"], False)):
            child_count = child["leaf_count"] if "leaf_value" in child else child["internal_count"]
            split.append(best(child, path + [(node["split_index"], node["split_feature"], left,
                                               child_count / count)]))
        cost, groups = split[0][0] + split[1][0], split[0][1] + split[1][1]
        leaves = [leaf for _, members in groups for leaf in members]
        nodes = sorted({n for *_, leaf_path in leaves for n, _, _, _ in leaf_path})
        if len(nodes) <= GROUP_BITS:
            w = len({f for *_, leaf_path in leaves for _, f, _, _ in leaf_path})
            whole = w + GROUP_COST + MEMORY_WEIGHT * (w << len(nodes))
            if whole <= cost:
                return whole, [(nodes, leaves)]
        return cost, groups
    return best(root, [])[1]


def _node_arrays(trees: list, num_features: int) -> dict[str, np.ndarray]:
    """Per node slot (8 * chunks per tree, by split_index): where in _values it reads, its threshold."""
    chunks = max(1, (max(len(nodes) for _, nodes, _ in trees) + 7) // 8) if trees else 1
    size = len(trees) * 8 * chunks
    source = np.full(size, 5 * num_features, dtype=np.intp)       # padding reads NaN: never left
    threshold = np.zeros(size)
    for t, (_, nodes, _) in enumerate(trees):
        for node in nodes:
            missing = MISSING_TYPES[node["missing_type"]]
            kind = {2: 0 if node["default_left"] else 1, 0: 2, 1: 3 if node["default_left"] else 4}[missing]
            slot = t * 8 * chunks + node["split_index"]
            source[slot] = kind * num_features + node["split_feature"]
            # dump_model writes thresholds through AvoidInf (|t| >= 1e300 -> +-1e300); model.txt and
            # LightGBM's own decisions keep the infinity
            threshold[slot] = node["threshold"] if abs(node["threshold"]) < 1e300 else np.copysign(np.inf, node["threshold"])
    max_nodes = max((len(nodes) for _, nodes, _ in trees), default=0)
    chunk_count = np.array([min(8, max_nodes - 8 * b) for b in range(chunks)], dtype=np.intp)
    return {"node_source": source, "node_threshold": threshold, "chunk_count": chunk_count}


def _group_arrays(trees: list, width: int, chunk_count: np.ndarray) -> dict[str, np.ndarray]:
    """Each group's table (a row of its features' summed contributions per index), look-ups from a
    tree's decision bytes to the group's row offset in its table (summed over the tree's chunks: the
    index bits of different chunks are distinct), and the (group, feature) elements sorted by key."""
    tables = _leaf_tables_by_id([leaf for _, _, groups in trees for _, leaves in groups for leaf in leaves])
    chunks = chunk_count.size
    count = sum(len(groups) for _, _, groups in trees)
    parts, lut_parts = [], [np.zeros(256, dtype=np.intp)]          # look-up row 0: no bits in a chunk
    lut_base = np.zeros((chunks, count), dtype=np.intp)
    lut_byte = np.zeros((chunks, count), dtype=np.intp)
    elem_group, elem_offset, elem_key = [], [], []
    cursor, lut_cursor, g = 0, 256, 0
    for t, (klass, _, groups) in enumerate(trees):
        for nodes, leaves in groups:
            table, features, bits = (_node_group(nodes, leaves, tables) if nodes
                                     else _leaf_group(leaves[0], tables.pop(id(leaves[0]))))
            parts.append(table.reshape(-1))
            elem_group += [g] * len(features)
            elem_offset += range(cursor, cursor + len(features))
            elem_key += [klass * width + f for f in features]
            cursor += table.size
            for b in range(chunks):
                lut_byte[b, g] = t * chunks + b
                mine = [(node - 8 * b, left, shift) for node, left, shift in bits if 8 * b <= node < 8 * b + 8]
                if not mine:
                    continue
                byte = np.arange(1 << chunk_count[b])
                pattern = np.zeros(byte.size, dtype=np.intp)
                for node, left, shift in mine:
                    pattern |= (((byte >> node) & 1) != left).astype(np.intp) << shift
                lut_parts.append(pattern * len(features))
                lut_base[b, g] = lut_cursor
                lut_cursor += byte.size
            g += 1
    order = np.argsort(np.array(elem_key, dtype=np.intp), kind="stable")
    key = np.array(elem_key, dtype=np.intp)[order]
    starts = np.flatnonzero(np.diff(key, prepend=-1))
    return {
        "table": np.concatenate(parts) if parts else np.zeros(0),
        "lut": np.concatenate(lut_parts),
        "lut_base": lut_base.reshape(-1),
        "lut_byte": lut_byte.reshape(-1),
        "elem_group": np.array(elem_group, dtype=np.intp)[order],
        "elem_offset": np.array(elem_offset, dtype=np.intp)[order],
        "key": key[starts],
        "key_start": starts,
    }


def _leaf_group(leaf: tuple, table: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[int, bool, int]]]:
    """One leaf's table re-indexed by a mismatch bit per (feature, chunk), its features and look-up
    bits (node, left, bit): a feature whose nodes lie in two chunks gets two bits, so that the chunks'
    look-ups add up instead of being OR-ed."""
    entries, features, _ = _merge(leaf[3])
    bit: dict[tuple[int, int], int] = {}
    for node, _, slot in entries:
        bit.setdefault((slot, node // 8), len(bit))
    index = np.arange(1 << len(bit))
    mismatch = np.zeros(index.size, dtype=np.intp)
    for (slot, _), j in bit.items():
        mismatch |= ((index >> j) & 1) << slot
    return table[mismatch], features, [(node, left, bit[slot, node // 8]) for node, left, slot in entries]


def _node_group(nodes: list[int], leaves: list, tables: dict[int, np.ndarray]
                ) -> tuple[np.ndarray, list[int], list[tuple[int, bool, int]]]:
    """The summed table of ``leaves`` indexed by the decisions of ``nodes`` (bit j set = node j goes
    left), its features and its look-up bits (node, left=False, j), so bit j is set when node j goes left."""
    position = {node: j for j, node in enumerate(nodes)}
    decision = (np.arange(1 << len(nodes))[:, None] >> np.arange(len(nodes))) & 1 == 1
    features: dict[int, int] = {}
    for *_, path in leaves:
        for _, feature, _, _ in path:
            features.setdefault(feature, len(features))
    table = np.zeros((decision.shape[0], len(features)))
    for leaf in leaves:
        entries, leaf_features, _ = _merge(leaf[3])
        mismatch = np.zeros(decision.shape[0], dtype=np.intp)
        for node, left, slot in entries:
            mismatch |= (decision[:, position[node]] != left).astype(np.intp) << slot
        table[:, [features[f] for f in leaf_features]] += tables.pop(id(leaf))[mismatch]
    return table, list(features), [(node, False, j) for j, node in enumerate(nodes)]


def _has_linear_leaves(node: dict[str, Any]) -> bool:
    stack = [node]
    while stack:
        node = stack.pop()
        if "leaf_coeff" in node or "leaf_const" in node:
            return True
        stack.extend(node[child] for child in ("left_child", "right_child") if child in node)
    return False


def _leaf_tables_by_id(leaves: list) -> dict[int, np.ndarray]:
    """Every leaf's (2^d, d) table (see _leaf_tables), keyed by id() of its leaf tuple."""
    merged = [_merge(path) for *_, path in leaves]
    depth = np.array([len(features) for _, features, _ in merged], dtype=np.intp)
    if depth.max(initial=0) > 16:
        raise NotImplementedError("a leaf with more than 16 features on its path (table too large)")
    needed = int((np.left_shift(1, depth) * depth).sum()) * 8
    if needed > BUILD_BUDGET_BYTES:
        raise NotImplementedError(f"the leaf tables would take {needed / 2**20:.0f} MB "
                                  f"(more than {BUILD_BUDGET_BYTES / 2**20:.0f} MB)")
    tables = {}
    for d in np.unique(depth):
        members = np.flatnonzero(depth == d)
        zero = np.array([merged[i][2] for i in members], dtype=np.float64).reshape(len(members), d)
        value = np.array([leaves[i][1] for i in members], dtype=np.float64)
        for i, table in zip(members, _leaf_tables(zero, value)):
            tables[id(leaves[i])] = table
    return tables


def _merge(path: list[tuple[int, int, bool, float]]) -> tuple[list[tuple[int, bool, int]], list[int], list[float]]:
    """A path merged by feature, in order of each feature's last node (the order LightGBM's recursion
    leaves them in): entries (node, left, slot), then per slot its feature and zero fraction."""
    merged: dict[int, float] = {}
    for _, feature, _, fraction in path:
        merged[feature] = merged.pop(feature, 1.0) * fraction
    slot = {feature: i for i, feature in enumerate(merged)}
    entries = [(node, left, slot[feature]) for node, feature, left, _ in path]
    return entries, list(merged), list(merged.values())


def _leaf_tables(zero: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(leaves, 2^d, d) contributions of leaves with d unique path features for every mismatch pattern
    m (bit j set = the row leaves the path at feature j's nodes, o_j = 0).

    UnwoundPathSum(j) is the sum of the weights of the path without j, so it does not depend on o_j;
    with o_j = 0 it is UnwoundPathSum's cheap branch, sum_i w_i (d+1)/(d-i) / z_j over the full path's
    weights w. Hence contribution(m, j) = value * (o_j - z_j) * Q(m | 2^j) / z_j with Q(m) that sum.
    """
    count, d = zero.shape
    if not (zero > 0).all():
        raise NotImplementedError("a split with a child that saw no training rows (zero fraction 0)")
    mismatch = (np.arange(1 << d)[:, None] >> np.arange(d)) & 1              # (patterns, d)
    gather = np.arange(1 << d)[:, None] | (1 << np.arange(d))                # m | 2^j
    out = np.empty((count, 1 << d, d))
    block = max(1, BLOCK_ROWS >> d)
    for start in range(0, count, block):
        z = zero[start:start + block, None, :]
        q = _pattern_sums(zero[start:start + block])
        out[start:start + block] = (value[start:start + block, None, None] * (1 - mismatch - z)
                                    * q[:, gather] / z)
    return out


def _pattern_sums(zero: np.ndarray) -> np.ndarray:
    """Q(m) = sum_i w_i (d+1)/(d-i), i < d, for every leaf (rows of ``zero``) and mismatch pattern m,
    where w are the path weights after ExtendPath of the root's dummy (z = o = 1) and each feature.

    Extending feature k only depends on bits < k, so each step extends the 2^k patterns so far twice,
    with o_k = 1 (bit k clear) and o_k = 0 (bit k set)."""
    count, d = zero.shape
    weight = np.ones((count, 1, 1))
    for k in range(1, d + 1):
        j = np.arange(k)
        kept = np.zeros(weight.shape[:2] + (k + 1,))
        kept[..., :k] = zero[:, k - 1, None, None] * weight * ((k - j) / (k + 1))
        taken = kept.copy()
        taken[..., 1:] += weight * ((j + 1) / (k + 1))
        weight = np.concatenate([taken, kept], axis=1)
    return (weight[..., :d] * ((d + 1) / (d - np.arange(d)))).sum(axis=-1)
