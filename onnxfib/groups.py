"""Shrink groups: channels tied across tensors, and the partitions a group may collapse along.

Sites tie channels of their ports (`Link`): element-wise ops tie channel i to channel i,
Concat ties an input's channel to its offset in the output, Flatten ties feature (c, s) to
channel c, a depthwise Conv ties its output channels to their input channel. Tied channels
form *base classes* (connected components over all channels); tensors sharing classes form a
group. A member may hold several channels of one class (Flatten's spatial positions); its
*position* numbers them in channel order, which pairs them across classes (c-major layouts,
concatenated parts). A partition of the base classes is valid for every member when, within
a class color, each member's channels at equal positions carry equal colors; the group's
partition is the meet over members of their colors laid out per (class, position).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .partition import Partition
from .rules.base import Link, Port


@dataclass(frozen=True)
class Member:
    """A tensor of a group: its port, the base class and the position of each channel."""

    port: Port
    classes: np.ndarray
    position: np.ndarray


@dataclass(frozen=True)
class ShrinkGroup:
    """Tensors whose channel axes narrow together, with the classes frozen by their members."""

    members: dict[str, Member]
    n_classes: int
    frozen: np.ndarray  # per base class
    reasons: dict[int, str]  # a frozen class's first reason

    def base_partition(self, *labelings: dict[str, np.ndarray], honor_frozen: bool) -> Partition:
        """Coarsest partition of the base classes under which every labeling of every member
        stays constant on each (class color, position); frozen classes alone when asked."""
        columns = []
        for labels in labelings:
            for name, member in self.members.items():
                keys = np.full((self.n_classes, int(member.position.max()) + 1), -1, dtype=np.int64)
                keys[member.classes, member.position] = labels[name]
                columns.append(keys)
        if honor_frozen:
            columns.append(np.where(self.frozen, np.arange(1, self.n_classes + 1), 0)[:, None])
        return Partition.from_rows(np.hstack(columns))

    def induced(self, name: str, base: Partition) -> Partition:
        """The partition of one member's channels that ``base`` implies."""
        member = self.members[name]
        return Partition.from_rows(np.column_stack([base.labels[member.classes], member.position]))

    def equal_blocks(self, name: str, size: int, base: Partition) -> Partition:
        """Refine ``base`` so each block of ``size`` consecutive channels of member ``name`` (an
        attention head) keeps as many colors as the block that keeps most: heads stay equal
        in width. Colors already never cross blocks (the site's constraint labels)."""
        classes = self.members[name].classes
        labels = base.labels.copy()
        blocks = classes.reshape(-1, size)
        target = max(np.unique(labels[block]).size for block in blocks)
        fresh = labels.max() + 1
        for block in blocks:
            while np.unique(labels[block]).size < target:
                values, counts = np.unique(labels[block], return_counts=True)
                largest = values[np.argmax(counts)]
                labels[block[labels[block] == largest][-1]] = fresh  # split one channel off
                fresh += 1
        return Partition(labels)

    def frozen_reason(self, name: str) -> str | None:
        """Why (some of) a member's channels may not narrow, None if all may."""
        classes = self.members[name].classes
        frozen = classes[self.frozen[classes]]
        if frozen.size == 0:
            return None
        reason = self.reasons[int(frozen[0])]
        return reason if frozen.size == classes.size else f"partly: {reason}"


def build_groups(ports: dict[str, Port], links: list[Link], freeze: dict[str, str]) -> list[ShrinkGroup]:
    """Groups of the tensors in ``ports`` tied by ``links``; ``freeze`` names frozen tensors."""
    names = list(ports)
    widths = np.array([ports[n].width for n in names], dtype=np.int64)
    offsets = dict(zip(names, np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()))
    total = int(widths.sum())
    heads, tails = [np.arange(total)], [np.arange(total)]
    for link in links:
        a, b = ports[link.a.name], ports[link.b.name]
        if (a.width, b.width) != (link.a.width, link.b.width):
            continue  # the tensors' ports disagree; freeze_reasons already froze them
        b_to_a = np.arange(b.width) if link.b_to_a is None else np.asarray(link.b_to_a)
        heads.append(offsets[a.name] + b_to_a)
        tails.append(offsets[b.name] + np.arange(b.width))
    heads_all, tails_all = np.concatenate(heads), np.concatenate(tails)
    adjacency = coo_matrix((np.ones(heads_all.size), (heads_all, tails_all)), shape=(total, total))
    _, channel_class = connected_components(adjacency, directed=False)

    # tensors sharing a class belong to one group: components of the tensor-class graph
    n_classes = int(channel_class.max()) + 1 if total else 0
    tensor_of = np.repeat(np.arange(len(names)), widths)
    bipartite = coo_matrix((np.ones(total), (tensor_of, len(names) + channel_class)),
                           shape=(len(names) + n_classes,) * 2)
    _, component = connected_components(bipartite, directed=False)

    grouped: dict[int, list[str]] = {}
    for index, name in enumerate(names):
        grouped.setdefault(int(component[index]), []).append(name)
    groups = []
    for members in grouped.values():
        global_classes = np.concatenate([channel_class[offsets[n]:offsets[n] + ports[n].width] for n in members])
        unique, local = np.unique(global_classes, return_inverse=True)
        frozen = np.zeros(unique.size, dtype=bool)
        reasons: dict[int, str] = {}
        built: dict[str, Member] = {}
        start = 0
        for name in members:
            width = ports[name].width
            classes = local[start:start + width]
            start += width
            reason = freeze.get(name)
            if reason:
                for cls in classes[~frozen[classes]]:
                    reasons[int(cls)] = f"'{name}' {reason}"
                frozen[classes] = True
            built[name] = Member(ports[name], classes, _rank_within_class(classes))
        groups.append(ShrinkGroup(built, unique.size, frozen, reasons))
    return groups


def _rank_within_class(classes: np.ndarray) -> np.ndarray:
    """For each channel, how many channels of the same class come before it."""
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, classes.size]))
    rank = np.empty_like(classes)
    rank[order] = np.arange(classes.size) - run_start
    return rank
