"""Exact path-dependent TreeSHAP for LightGBM models: LightGBM's pred_contrib for one row in ~0.1 ms.

LightGBM's ``predict(pred_contrib=True)`` runs Lundberg's recursive TreeSHAP (src/io/tree.cpp ``TreeSHAP``)
for every tree, every time. The result is a sum over leaves (the GPUTreeShap decomposition): merge a
leaf's root-to-leaf path by feature; feature i gets a zero fraction z_i (the product of child count /
node count over its nodes) and a one fraction o_i, 1 iff the row follows the path at every node of
feature i. The leaf adds leaf_value * (o_i - z_i) * (unwound path weight of i) to feature i. Only the
o's depend on the row and they are bits, so each leaf's contributions are a function of a d-bit
pattern: we tabulate them for all 2^d patterns at load, and serving a row is node decisions, one
bit pattern per leaf, one gather and one bincount.
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
# (leaf, pattern) rows per block of the table computation; bounds the temporaries to a few MB.
BLOCK_ROWS = 1 << 15


class TreeExplainer:
    """Tabulated TreeSHAP for one Booster; ``contributions`` equals ``predict(X, pred_contrib=True)``.

    Serving one row: every node's decision at once (nodes laid out 8 * chunks per tree), packed to
    bytes; each leaf's mismatch pattern from one look-up per byte of its tree; each (leaf, feature)
    element's table value; one bincount into (class, feature).
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
        leaves = self._leaf_depth.size
        pattern = lookup[:leaves]
        for chunk in range(1, self._chunk_count.size):
            pattern = pattern | lookup[chunk * leaves:(chunk + 1) * leaves]
        row_start = self._leaf_offset + self._leaf_depth * pattern
        index = row_start.take(self._elem_leaf) + self._elem_slot
        out = self._bias + np.bincount(self._elem_key, weights=self._table.take(index), minlength=self._width)
        return out if self.num_class == 1 else out.reshape(self.num_class, self.num_features + 1)

    def _values(self, x: np.ndarray) -> np.ndarray:
        """x five times over, NaN replaced as each kind of node reads it (tree.h NumericalDecision),
        then NaN for padding nodes. -inf always goes left and NaN never does (even against an infinite
        threshold): missing_type NaN sends NaN left (-inf) or right (NaN); None reads NaN as 0.0; Zero
        sends NaN and |x| <= kZeroThreshold left (-inf) or right (NaN)."""
        f = self.num_features
        out = np.empty(5 * f + 1)
        # LightGBM's C API reads a dense row as sparse pairs, keeping only |x| > kZeroThreshold or NaN
        # (c_api.cpp RowFunctionFromDenseMatric): 1e-36 is predicted as 0.0
        x = np.where(np.abs(x) <= K_ZERO_THRESHOLD, 0.0, x)
        missing = np.isnan(x)
        out[:f] = x
        out[:f][missing] = -np.inf
        out[f:2 * f] = x
        out[2 * f:3 * f] = x
        out[2 * f:3 * f][missing] = 0.0
        if self._has_zero:
            missing |= x == 0.0
            out[3 * f:4 * f] = np.where(missing, -np.inf, x)
            out[4 * f:5 * f] = np.where(missing, np.nan, x)
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
        total = root["internal_count"]
        bias[klass * width + num_features] += sum(
            count / total * value for _, value, count, _ in sorted(tree_leaves, key=lambda leaf: leaf[0]))
        trees.append((klass, nodes, tree_leaves))
    arrays = _node_arrays(trees, num_features)
    arrays.update(_leaf_arrays(trees, width, arrays["chunk_count"]))
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


def _leaf_arrays(trees: list, width: int, chunk_count: np.ndarray) -> dict[str, np.ndarray]:
    """Tables, look-ups from a tree's decision bytes to each leaf's mismatch pattern, and elements."""
    leaves = []      # (value, class, tree, entries [(node, left, slot)], features, zero fractions)
    for t, (klass, _, tree_leaves) in enumerate(trees):
        for _, value, _, path in tree_leaves:
            leaves.append((value, klass, t, *_merge(path)))
    depth = np.array([len(leaf[4]) for leaf in leaves], dtype=np.intp)
    if depth.max(initial=0) > 16:
        raise NotImplementedError("a leaf with more than 16 features on its path (table too large)")

    offset = np.zeros(len(leaves), dtype=np.intp)
    parts, cursor = [], 0
    for d in np.unique(depth):
        members = np.flatnonzero(depth == d)
        zero = np.array([leaves[i][5] for i in members], dtype=np.float64).reshape(len(members), d)
        value = np.array([leaves[i][0] for i in members], dtype=np.float64)
        parts.append(_leaf_tables(zero, value).reshape(-1))
        offset[members] = cursor + np.arange(len(members)) * (d << d)
        cursor += len(members) * (d << d)

    # look-ups: row 0 (256 zeros) for a leaf with no node in a chunk, else one row per (leaf, chunk)
    chunks = chunk_count.size
    lut_parts = [np.zeros(256, dtype=np.uint16)]
    lut_base = np.zeros((chunks, len(leaves)), dtype=np.intp)
    lut_cursor = 256
    entries = np.array([(i, node, left, slot) for i, leaf in enumerate(leaves) for node, left, slot in leaf[3]],
                       dtype=np.intp).reshape(-1, 4)
    for b in range(chunks):
        chunk = entries[(entries[:, 1] >= 8 * b) & (entries[:, 1] < 8 * b + 8)]
        byte = np.arange(1 << chunk_count[b])
        mismatch = ((byte[None, :] >> (chunk[:, 1, None] - 8 * b)) & 1) != chunk[:, 2, None]
        bits = (mismatch.astype(np.uint16) << chunk[:, 3, None].astype(np.uint16))
        touched, starts = np.unique(chunk[:, 0], return_index=True)
        lut_parts.append(np.bitwise_or.reduceat(bits, starts, axis=0).reshape(-1))
        lut_base[b, touched] = lut_cursor + np.arange(touched.size) * byte.size
        lut_cursor += touched.size * byte.size
    tree_of = np.array([leaf[2] for leaf in leaves], dtype=np.intp)

    elem_leaf = np.repeat(np.arange(len(leaves), dtype=np.intp), depth)
    elem_feature = np.array([f for leaf in leaves for f in leaf[4]], dtype=np.intp)
    elem_class = np.array([leaf[1] for leaf in leaves], dtype=np.intp)[elem_leaf]
    return {
        "table": np.concatenate(parts) if parts else np.zeros(0),
        "lut": np.concatenate(lut_parts),
        "lut_base": lut_base.reshape(-1),
        "lut_byte": (tree_of[None, :] * chunks + np.arange(chunks)[:, None]).reshape(-1),
        "leaf_offset": offset,
        "leaf_depth": depth,
        "elem_leaf": elem_leaf,
        "elem_slot": np.arange(elem_leaf.size) - np.repeat(np.cumsum(depth) - depth, depth),
        "elem_key": elem_class * width + elem_feature,
    }


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
