import numpy as np
import torch

from liverseg.data.store import SliceStore
from liverseg.training.batches import DeviceBatches, SliceSet, assign_cases, epoch_indices, norm_stats


def test_assign_cases_balances_slices():
    shares = assign_cases({"a": 100, "b": 90, "c": 50, "d": 40, "e": 10}, 2)
    loads = [sum({"a": 100, "b": 90, "c": 50, "d": 40, "e": 10}[c] for c in s) for s in shares]
    assert sorted(sum(shares, [])) == ["a", "b", "c", "d", "e"] and abs(loads[0] - loads[1]) <= 10


def test_epoch_indices_cover_and_repeat():
    idx = epoch_indices(10, 25, seed=3)
    assert len(idx) == 25 and set(idx[:10].tolist()) == set(range(10))
    assert torch.equal(idx, epoch_indices(10, 25, seed=3)) and not torch.equal(idx, epoch_indices(10, 25, seed=4))


def test_slice_set_neighbours_stay_inside_their_case(store_path):
    st = SliceStore(store_path)
    cases = st.cases[:2]
    one, three = SliceSet(st, cases, 1), SliceSet(st, cases, 3)
    z0 = st.num_slices(cases[0])
    assert len(one) == z0 + st.num_slices(cases[1])
    img, msk = three.batch(torch.tensor([0, z0 - 1, z0]))
    vol0, vol1 = st.volume(cases[0])[0], st.volume(cases[1])[0]
    assert img.shape == (3, 3, 64, 64) and img.dtype == torch.int16 and msk.dtype == torch.uint8
    assert np.array_equal(img[0, 0].numpy(), vol0[0]) and np.array_equal(img[0, 2].numpy(), vol0[1])  # clamped
    assert np.array_equal(img[1, 2].numpy(), vol0[z0 - 1])  # not the next case's first slice
    assert np.array_equal(img[2, 1].numpy(), vol1[0])
    dev = DeviceBatches(three, torch.device("cpu"), 3)
    a, b = dev.get(torch.tensor([0, z0 - 1, z0]))
    assert torch.equal(a, img) and torch.equal(b, msk)
    assert torch.equal(three.case_slices(1), torch.arange(z0, len(three)))


def test_norm_stats_are_seeded_and_plausible(store_path):
    st = SliceStore(store_path)
    a = norm_stats(st, st.cases_in("train"), (-200, 250), 64, seed=0)
    assert a == norm_stats(st, st.cases_in("train"), (-200, 250), 64, seed=0)
    assert 0 < a[0] < 1 and 0 < a[1] < 0.6


def test_store_opens_from_a_url(store_path):
    st = SliceStore("file://" + store_path)
    assert st.cases == SliceStore(store_path).cases
    assert np.array_equal(st.slices(st.cases[0], [1])[0], SliceStore(store_path).slices(st.cases[0], [1])[0])
