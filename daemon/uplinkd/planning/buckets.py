"""Bucket arithmetic shared by the weighted and persistence methods.

A rule's bucket count never depends on which links are up, so a link state change only rewrites
map contents. Buckets are owned by links in exact weight proportion; when links go down, only
their buckets move, to the surviving links that are furthest below their share.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import const

# Beyond this many links the subset enumeration is skipped (2**8 subsets is still instant).
_MAX_LINKS_FOR_EXACT_SUBSETS = 8


@dataclass(frozen=True)
class Weighted:
    link_id: int
    name: str
    weight: int


def exact_bucket_count(weights: Sequence[int], minimum: int = 1) -> int:
    """The smallest count >= minimum that splits exactly by the weights of any subset of links.

    Falls back to a multiple of the total weight when that count would be huge.
    """
    total = sum(weights)
    count = total
    if len(weights) <= _MAX_LINKS_FOR_EXACT_SUBSETS:
        sums = {
            sum(subset)
            for size in range(1, len(weights) + 1)
            for subset in itertools.combinations(weights, size)
        }
        lcm = math.lcm(*sums)
        if lcm <= const.MAX_EXACT_BUCKETS:
            count = lcm
    return count * max(1, math.ceil(minimum / count))


def _quotas(count: int, members: Sequence[Weighted]) -> dict[int, int]:
    """Largest-remainder split of `count` buckets by weight."""
    total = sum(m.weight for m in members)
    exact = {m.link_id: count * m.weight / total for m in members}
    quotas = {link_id: math.floor(share) for link_id, share in exact.items()}
    left = count - sum(quotas.values())
    by_remainder = sorted(members, key=lambda m: (quotas[m.link_id] - exact[m.link_id], m.link_id))
    for member in by_remainder[:left]:
        quotas[member.link_id] += 1
    return quotas


def _preference(seed: str, bucket: int, members: Sequence[Weighted]) -> list[Weighted]:
    """A stable per-bucket ranking of links (rendezvous hashing by name)."""

    def score(member: Weighted) -> bytes:
        return hashlib.blake2b(f"{seed}/{bucket}/{member.name}".encode(), digest_size=8).digest()

    return sorted(members, key=score)


def assign(
    count: int, members: Sequence[Weighted], live: set[int], seed: str
) -> tuple[int | None, ...]:
    """Owner link id per bucket (None where no link is live).

    The base assignment over all members depends only on (count, members, seed); live links keep
    their base buckets, and the buckets of dead links go to live links in proportion to weight.
    """
    if not members:
        return (None,) * count
    preferences = [_preference(seed, bucket, members) for bucket in range(count)]
    remaining = _quotas(count, members)
    owners: list[int | None] = []
    for ranking in preferences:
        owner = next(m.link_id for m in ranking if remaining[m.link_id] > 0)
        remaining[owner] -= 1
        owners.append(owner)

    alive = [m for m in members if m.link_id in live]
    if not alive:
        return (None,) * count
    if len(alive) == len(members):
        return tuple(owners)
    held = {m.link_id: owners.count(m.link_id) for m in alive}
    deficit = {
        link_id: max(0, quota - held[link_id]) for link_id, quota in _quotas(count, alive).items()
    }
    for bucket, previous in enumerate(owners):
        if previous in live:
            continue
        ranking = [m for m in preferences[bucket] if m.link_id in live]
        heir = next((m for m in ranking if deficit[m.link_id] > 0), ranking[0])
        deficit[heir.link_id] = max(0, deficit[heir.link_id] - 1)
        owners[bucket] = heir.link_id
    return tuple(owners)
