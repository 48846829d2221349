"""Data-free choice of which channels of a merged layer join: folding by incoming and outgoing weights.

Cosine clustering of a layer's rows (the eps of DESIGN §2) sees only each row's direction: it
ignores how much a channel matters downstream, so at high compression it spends colors on
channels that barely reach the output. Where a layer's output is read by exactly one layer
(through element-wise sites, pooling or a Flatten: :func:`outgoing_weights`), :class:`Folder`
clusters the channels instead by Ward linkage on each channel's incoming row, bias and outgoing
weights (the reader's columns that carry it) concatenated, the description of a unit in Model
Folding (Wang et al., ICLR 2025), into as many colors as the layer's collapse keeps.
The merge itself is unchanged: ``Tolerance.chosen`` given a Partition fits the scales to the
rows, ``Plan.fit_base`` gives the base rows, and the reader's columns are summed under the
scales. :func:`sole_reader` is the stricter channel-for-channel reader the data-driven
``calibrate.Selector`` needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from scipy.cluster.hierarchy import fcluster, linkage

from .analysis import Analysis, analyze
from .groups import ShrinkGroup
from .partition import Partition
from .rules.linear import LinearSite


def _group_reader(analysis: Analysis, site: LinearSite) -> tuple[ShrinkGroup, LinearSite] | None:
    """The shrink group of ``site``'s output and the one layer reading it; None where the group is
    frozen anywhere or no layer or several read it."""
    out = site.outputs[0]
    group = next((g for g in analysis.groups if out.name in g.members), None)
    if group is None or group.frozen.any():
        return None
    readers = [r for r in analysis.sites if isinstance(r, LinearSite) and r.layer and r.inputs[0].name in group.members]
    return (group, readers[0]) if len(readers) == 1 else None


def sole_reader(analysis: Analysis, site: LinearSite) -> LinearSite | None:
    """The one layer reading ``site``'s output channel for channel: through element-wise sites
    only (every tensor of the output's shrink group as wide as the output, channel i of each the
    same class) and nothing frozen in the group. None where no layer or several read it."""
    found = _group_reader(analysis, site)
    if found is None:
        return None
    group, reader = found
    out = site.outputs[0]
    classes = group.members[out.name].classes
    if any(m.port.width != out.width or not np.array_equal(m.classes, classes) for m in group.members.values()):
        return None
    return reader


def outgoing_weights(analysis: Analysis, site: LinearSite) -> np.ndarray | None:
    """Each output channel's outgoing weights, one row per channel: the columns of the one layer
    reading the output's shrink group that carry that channel (one for an element-wise path,
    every spatial position after a Flatten), in position order. None where the group is
    frozen, no layer or several read it, or the channels do not carry equally many columns."""
    found = _group_reader(analysis, site)
    if found is None:
        return None
    group, reader = found
    out = site.outputs[0]
    own, read = group.members[out.name].classes, group.members[reader.inputs[0].name]
    counts = np.bincount(read.classes, minlength=group.n_classes)[own]
    if len(np.unique(own)) != out.width or counts.min() == 0 or counts.min() != counts.max():
        return None
    order = np.lexsort((read.position, read.classes))  # the reader's columns by class, then position
    columns = np.moveaxis(reader.matrix(), 1, 0)[order].reshape(len(np.unique(read.classes)), -1)
    return columns[np.searchsorted(np.unique(read.classes), own)]


class Folder:
    """Folded colorings of ``original``'s layers (see the module docstring). The Ward tree of every
    eligible layer is built once, on the original weights; each call only cuts the trees."""

    def __init__(self, original: onnx.ModelProto) -> None:
        reference = analyze(original, eps=0.0)
        self._trees: dict[str, np.ndarray] = {}
        for site in reference.sites:
            if isinstance(site, LinearSite) and site.layer and site.outputs[0].width > 2:
                outgoing = outgoing_weights(reference, site)
                if outgoing is not None:
                    rows, bias, _ = site.flat()
                    self._trees[site.name] = linkage(np.hstack([rows, bias[:, None], outgoing]), method="ward")

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
