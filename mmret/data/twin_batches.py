"""Twin batches: each sample drawn into a batch brings the samples its caption's perturbations describe.

    batcher = TwinBatcher(perturber, twins_per_sample=3, pool_size=5000)
    for raw in batcher.stream(raw_samples, rng, batch_size=128): ...   # anchors, each followed by its twins

In-batch negatives are random: a batch of 128 drawn from a few thousand scenes almost never holds "a blue
circle left of a red square" beside "a red circle left of a blue square", the pair a bag-of-words model
cannot tell apart. Adding such confusers as extra inputs (mined images, `data.mined_negatives`) costs one
more image encoding each. Grouping them into the batch costs nothing: the same number of samples is encoded,
each is still some row's positive, and every row now meets its twins in both directions (twin images in the
text->image denominators, twin captions in the image->text ones), gathered across ranks like any in-batch row.

How twins are found, without a model: the shuffle buffer becomes a pool indexed by the normalized captions of
its samples. A sample drawn from the pool (uniformly: the pool is the shuffle buffer, so without twins this
is the plain shuffled stream) is an anchor; the perturbations of each of its captions
(`mmret.data.perturb.CaptionPerturber.candidates`) are looked up in the index, and up to `twins_per_sample`
matching pool samples follow it, drawn tier by tier: first those a word-keeping strategy describes (attribute
or object swap, the phrases around a relation swapped: binding and order), then a replaced word of the same
class, then any two content words swapped. A pool sample is never the anchor's twin when it also carries one
of the anchor's captions. Every sample taken is replaced by the next one of the stream, so each sample of
the stream is still drawn once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mmret.data.perturb import CaptionPerturber, normalize
from mmret.errors import UsageError

TWIN_OF = "__twin_of__"  # set on a raw sample drawn as a twin: the key of its anchor (decoding ignores it)
# Strategy tiers, hardest first: the same words in another binding or order, then one word replaced by another
# of its class, then a bag-of-words swap of two content words. `shuffle` is random, so it indexes nothing.
TWIN_TIERS: tuple[tuple[str, ...], ...] = (
    ("swap_attribute", "swap_object", "swap_around_relation"),
    ("replace_attribute", "replace_object", "replace_relation"),
    ("swap_words",),
)


def raw_captions(raw: dict) -> list[str]:
    """The normalized captions of a raw shard sample (its `.txt`, one per line); [] when it has none."""
    text = raw.get("txt")
    if not isinstance(text, (bytes, bytearray)):
        return []
    lines = (normalize(line) for line in text.decode("utf-8", "replace").splitlines())
    return [line for line in lines if line]


class TwinBatcher:
    """Orders a raw sample stream so that each anchor is followed by its bag-of-words twins from a pool.

    Args:
        perturber: Makes the candidate twin captions (its configured strategies; word classes enable the
            targeted ones).
        twins_per_sample: At most this many twins follow each anchor.
        pool_size: Raw samples held (the shuffle buffer); twins are looked for among them.
    """

    def __init__(self, perturber: CaptionPerturber, twins_per_sample: int, pool_size: int):
        if twins_per_sample < 1:
            raise UsageError(f"twins_per_sample is {twins_per_sample}; expected an integer >= 1")
        if pool_size < 2:
            raise UsageError(f"twin batches need a shuffle buffer of at least 2 samples, got {pool_size}")
        self.perturber = perturber
        self.twins_per_sample = twins_per_sample
        self.pool_size = pool_size
        self.tiers = [tuple(t for t in tier if t in perturber.types) for tier in TWIN_TIERS]
        self._candidate_cache: dict[str, list[set[str]]] = {}

    def twin_captions(self, captions: Sequence[str]) -> list[set[str]]:
        """Per tier, the normalized perturbations of `captions` that are not one of them."""
        own = set(captions)
        out: list[set[str]] = [set() for _ in self.tiers]
        for caption in captions:
            cached = self._candidate_cache.get(caption)
            if cached is None:
                cached = [
                    {normalize(c) for kind in tier for c in self.perturber.candidates(caption, kind)}
                    for tier in self.tiers
                ]
                if len(self._candidate_cache) < 200_000:
                    self._candidate_cache[caption] = cached
            for tier, found in zip(out, cached):
                tier.update(found)
        return [tier - own for tier in out]

    def stream(self, raw_stream: Iterator[dict], rng: np.random.Generator, batch_size: int) -> Iterator[dict]:
        """Raw samples, endlessly: anchors drawn at random from the pool, each followed by its twins.

        A group never crosses a batch boundary (counted in yielded samples, so a sample the caller later drops
        as broken shifts the boundary by one: harmless).
        """
        pool: list[dict] = []
        pool_captions: list[list[str]] = []
        index: dict[str, set[int]] = {}

        def put(slot: int, raw: dict) -> None:
            captions = raw_captions(raw)
            if slot == len(pool):
                pool.append(raw)
                pool_captions.append(captions)
            else:
                for caption in pool_captions[slot]:
                    holders = index[caption]
                    holders.discard(slot)
                    if not holders:
                        del index[caption]
                pool[slot], pool_captions[slot] = raw, captions
            for caption in captions:
                index.setdefault(caption, set()).add(slot)

        def take(slot: int) -> dict:
            raw = pool[slot]
            put(slot, next(raw_stream))
            return raw

        for raw in raw_stream:
            put(len(pool), raw)
            if len(pool) == self.pool_size:
                break
        position = 0  # within the current batch
        while True:
            anchor_slot = int(rng.integers(len(pool)))
            anchor_captions = pool_captions[anchor_slot]
            room = min(self.twins_per_sample, batch_size - position - 1)
            twins: list[int] = []
            if room > 0 and anchor_captions:
                # One sample per caption set: two images of the same twin composition would be each other's
                # false negatives and add no new confuser.
                taken = {frozenset(anchor_captions)}
                own = set(anchor_captions)
                for tier in self.twin_captions(anchor_captions):
                    if len(twins) == room:
                        break
                    by_captions: dict[frozenset, list[int]] = {}
                    for caption in sorted(tier):
                        for slot in sorted(index.get(caption, ())):
                            key = frozenset(pool_captions[slot])
                            if key not in taken and own.isdisjoint(key):
                                by_captions.setdefault(key, []).append(slot)
                    groups = list(by_captions.values())
                    for i in rng.permutation(len(groups))[: room - len(twins)]:
                        slots = sorted(set(groups[int(i)]))
                        slot = slots[int(rng.integers(len(slots)))]
                        twins.append(slot)
                        taken.add(frozenset(pool_captions[slot]))
            # Read every member before any is replaced: a replacement reuses the slot.
            group = [pool[anchor_slot]] + [pool[slot] for slot in twins]
            for raw in group[1:]:
                raw[TWIN_OF] = group[0]["__key__"]
            for slot in [anchor_slot, *twins]:
                take(slot)
            for raw in group:
                yield raw
            position = (position + len(group)) % batch_size
