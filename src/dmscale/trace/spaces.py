"""Dimension spaces: union-find classes of tensor dimensions that must keep the same elements.

A :class:`Space` labels one dimension of one tensor. Op rules tie dimensions together with
:func:`union`, refine one into parts with :func:`split` (heads x head_dim, a fused qkv), build
one from parts with :func:`composite` (a flatten, a ``cat``) and make one unprunable with
:func:`fix`. Everything here is pure bookkeeping: no torch ops, no knowledge of layers.
"""

from __future__ import annotations

import math

__all__ = ["Space", "TraceError", "union", "fix", "split", "tag", "composite", "ALIGN", "align", "alignment"]

ALIGN = "align:"  # tag prefix: kept counts of this space must be multiples of the number after it


class TraceError(RuntimeError):
    """The model could not be traced (the message names the op or module)."""


class Space:
    """A set of tensor dimensions that must be pruned together (union-find node).

    ``kind`` is 'atomic' (a leaf), 'product' (row-major product of ``children``, e.g. heads x
    head_dim) or 'concat' (concatenation of ``children``, e.g. q | k | v). ``fixed`` spaces are
    never pruned; ``fix_reasons`` says why. ``owned`` marks spaces some parameter dim lives in.
    """

    _next_id = 0

    def __init__(self, size: int, origin: str = "", fixed: bool = False) -> None:
        self.id = Space._next_id
        Space._next_id += 1
        self.size = int(size)
        self.origin = origin
        self.parent: Space | None = None
        self.kind = "atomic"  # 'atomic' | 'product' | 'concat'
        self.children: list[Space] = []
        self.fixed = fixed
        self.fix_reasons: list[str] = []
        self.tags: set[str] = set()
        self.owned = False  # some parameter dimension lives in this space

    def find(self) -> "Space":
        """Return the representative of this space's class (with path compression)."""
        root = self
        while root.parent is not None:
            root = root.parent
        node = self
        while node.parent is not None and node.parent is not root:
            nxt = node.parent
            node.parent = root
            node = nxt
        return root

    def leaves(self) -> list["Space"]:
        """Atomic roots this space is made of (itself when atomic)."""
        root = self.find()
        if root.kind == "atomic":
            return [root]
        out: list[Space] = []
        for c in root.children:
            out.extend(c.leaves())
        return out

    def same(self, other: "Space") -> bool:
        """True when both dimensions are in one class (they are pruned together)."""
        return self.find() is other.find()

    def __repr__(self) -> str:
        r = self.find()
        return f"Space#{r.id}({r.kind},{r.size},{r.origin})"


def fix(space: Space, reason: str) -> None:
    """Make a space unprunable (a composite: every part of it), remembering up to 8 reasons."""
    root = space.find()
    if root.kind == "atomic":
        if not root.fixed:
            root.fixed = True
        if reason and len(root.fix_reasons) < 8 and reason not in root.fix_reasons:
            root.fix_reasons.append(reason)
        return
    root.fixed = True
    for c in root.children:
        fix(c, reason)


def union(a: Space, b: Space) -> Space:
    """Merge two spaces of equal size; composite structures are merged component-wise.

    Two composites split in different ways cannot be merged exactly, so both are fixed (safe).
    """
    ra, rb = a.find(), b.find()
    if ra is rb:
        return ra
    if ra.size != rb.size:
        raise TraceError(f"internal: cannot unite dimensions of sizes {ra.size} and {rb.size} ({ra.origin} / {rb.origin})")
    if ra.kind == "atomic" and rb.kind != "atomic":
        ra, rb = rb, ra
    # now ra is composite or both atomic
    fixed_b = rb.fixed and rb.kind == "atomic"
    rb.parent = ra
    ra.tags |= rb.tags
    ra.owned = ra.owned or rb.owned
    if ra.kind == "atomic":
        ra.fixed = ra.fixed or rb.fixed
        ra.fix_reasons.extend(r for r in rb.fix_reasons if r not in ra.fix_reasons)
        return ra
    if rb.kind == "atomic":
        if fixed_b:
            fix(ra, rb.fix_reasons[0] if rb.fix_reasons else "")
        for leaf in ra.leaves():  # the atomic dim is the whole composite: its parts share its tags
            leaf.tags |= rb.tags
        return ra
    if rb.kind == ra.kind and [c.find().size for c in rb.children] == [c.find().size for c in ra.children]:
        for ca, cb in zip(ra.children, rb.children):
            union(ca, cb)
        return ra.find()
    # incompatible factorisations: give up pruning here (safe)
    reason = f"incompatible split of one dimension ({ra.kind} vs {rb.kind})"
    fix(ra, reason)
    for c in rb.children:
        fix(c, reason)
    return ra


def tag(space: Space, name: str) -> None:
    """Tag a space and, when it is composite (query heads = KV heads x repeats), its leaves."""
    space.find().tags.add(name)
    for leaf in space.leaves():
        leaf.tags.add(name)


def align(space: Space, multiple: int) -> None:
    """Kept counts of ``space`` must be multiples of ``multiple`` (a kernel's alignment, e.g. a grouped matmul's
    16-byte strides); the group built from it gets a divisor that is a multiple of it."""
    tag(space, f"{ALIGN}{int(multiple)}")


def alignment(space: Space) -> int:
    """The least common multiple of the alignments tagged on ``space`` (1: none)."""
    out = 1
    for t in space.find().tags:
        if t.startswith(ALIGN):
            out = math.lcm(out, int(t[len(ALIGN):]))
    return out


def composite(kind: str, parts: list[Space], origin: str) -> Space:
    """A new 'product' (flatten of several dims) or 'concat' (``cat``) space made of ``parts``."""
    parts = list(parts)
    size = math.prod(p.find().size for p in parts) if kind == "product" else sum(p.find().size for p in parts)
    s = Space(size, origin)
    s.kind = kind
    s.children = parts
    return s


def split(space: Space, sizes: list[int], kind: str, origin: str) -> list[Space]:
    """Refine a space into a product/concat of sub-spaces of the given sizes (reusing an existing split).

    A space already split in a different way cannot be refined again: it is fixed and the
    returned parts are new fixed spaces.
    """
    root = space.find()
    if root.kind == kind and [c.find().size for c in root.children] == list(sizes):
        return list(root.children)
    if root.kind == "atomic":
        children = [Space(n, origin + f"[{i}]", fixed=root.fixed) for i, n in enumerate(sizes)]
        for c in children:
            c.tags.add("split")
            c.owned = True
        root.kind = kind
        root.children = children
        return children
    reason = f"{origin}: dimension split in two different ways"
    fix(root, reason)
    return [Space(n, origin, fixed=True) for n in sizes]
