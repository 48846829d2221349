"""Data-free choice of which channels of a merged layer join: folding by incoming and outgoing weights.

Cosine clustering of a layer's rows (the eps of DESIGN §2) sees only each row's direction: it
ignores how much a channel matters downstream, so at high compression it spends colors on
channels that barely reach the output. Where a layer's output is read by exactly one layer,
channel for channel (:func:`sole_reader`), :class:`Folder` clusters the channels instead by Ward
linkage on each channel's incoming row, bias and outgoing column (the reader's weights on it)
concatenated, the description of a unit in Model Folding (Wang et al., ICLR 2025), into as many
colors as the layer's collapse keeps. The merge itself is unchanged: the scale rule with the
rows' norms as scales (``Tolerance.chosen`` given a Partition), ``Plan.fit_base`` rows and the
reader's columns summed under the scales.
"""

from __future__ import annotations

import numpy as np
import onnx
from scipy.cluster.hierarchy import fcluster, linkage

from .analysis import Analysis, analyze
from .partition import Partition
from .rules.linear import LinearSite


def sole_reader(analysis: Analysis, site: LinearSite) -> LinearSite | None:
    """The one layer reading ``site``'s output channel for channel: through element-wise sites
    only (every tensor of the output's shrink group as wide as the output, channel i of each the
    same class) and nothing frozen in the group. None where no layer or several read it."""
    out = site.outputs[0]
    group = next((g for g in analysis.groups if out.name in g.members), None)
    if group is None or group.frozen.any():
        return None
    classes = group.members[out.name].classes
    if any(m.port.width != out.width or not np.array_equal(m.classes, classes) for m in group.members.values()):
        return None
    readers = [r for r in analysis.sites if isinstance(r, LinearSite) and r.layer and r.inputs[0].name in group.members]
    return readers[0] if len(readers) == 1 else None


def unit_features(site: LinearSite, reader: LinearSite) -> np.ndarray:
    """Each output channel of ``site`` as a vector: its incoming row (kernel entries together),
    its bias and its outgoing column in ``reader``, float64."""
    rows, bias, _ = site.flat()
    outgoing = np.moveaxis(reader.matrix(), 1, 0).reshape(reader.inputs[0].width, -1)
    return np.hstack([rows, bias[:, None], outgoing])


class Folder:
    """Folded colorings of ``original``'s layers (see the module docstring). The Ward tree of every
    eligible layer is built once, on the original weights; each call only cuts the trees."""

    def __init__(self, original: onnx.ModelProto) -> None:
        reference = analyze(original, eps=0.0)
        self._trees: dict[str, np.ndarray] = {}
        for site in reference.sites:
            if isinstance(site, LinearSite) and site.layer and site.outputs[0].width > 2:
                reader = sole_reader(reference, site)
                if reader is not None:
                    self._trees[site.name] = linkage(unit_features(site, reader), method="ward")

    def colorings(self, analysis: Analysis) -> dict[str, Partition]:
        """Layer name -> the folded partition of its output with as many colors as ``analysis``
        keeps there, for every eligible layer that ``analysis`` narrows."""
        chosen: dict[str, Partition] = {}
        for site in analysis.sites:
            tree = self._trees.get(site.name)
            plan = analysis.plan(site.outputs[0]) if tree is not None else None
            if plan is not None and not plan.partition.is_discrete:
                labels = fcluster(tree, t=plan.partition.n_colors, criterion="maxclust")
                chosen[site.name] = Partition(labels)
        return chosen
