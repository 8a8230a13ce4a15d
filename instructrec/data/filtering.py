"""Iterative k-core filtering: drop users and items with fewer than k interactions until none is left.

One pass is not enough: dropping a rare item can push a user below k and the other way round.
"""

from __future__ import annotations

from collections import Counter

from instructrec.data.dataset import Dataset, Interaction


def k_core(dataset: Dataset, k: int = 5) -> Dataset:
    """A new `Dataset` where every user and item has at least `k` interactions, renumbered densely.

    Users and items keep their relative order; histories keep their (already sorted) order.
    """
    if k <= 1:
        return dataset
    users = set(range(dataset.n_users))
    items = set(range(dataset.n_items))
    while True:
        item_counts = Counter(x.item for u in users for x in dataset.histories[u] if x.item in items)
        user_counts = {u: sum(x.item in items for x in dataset.histories[u]) for u in users}
        keep_items = {i for i, n in item_counts.items() if n >= k}
        keep_users = {u for u, n in user_counts.items() if n >= k}
        if keep_items == items and keep_users == users:
            break
        items, users = keep_items, keep_users

    new_index = {old: new for new, old in enumerate(sorted(items))}
    kept_users = sorted(users)
    return Dataset(
        name=dataset.name,
        items=[dataset.items[i] for i in sorted(items)],
        users=[dataset.users[u] for u in kept_users],
        histories=[
            [
                Interaction(new_index[x.item], x.timestamp, x.rating, x.tags)
                for x in dataset.histories[u]
                if x.item in new_index
            ]
            for u in kept_users
        ],
        nouns=dataset.nouns,
    )
