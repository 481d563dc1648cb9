"""FNELoss against an oracle that materialises the float64 similarity matrices and uses the reference sampler:
same loss, same gradients (autograd through the oracle), and float64 gradcheck of the loss itself."""

import pytest
import torch

from fne_fast.ops import SamplerOptions
from fne_fast.ops.reference import sample_negatives_reference
from fne_fast.sampling.bank import MemoryBank
from fne_fast.sampling.loss import _TEXT_TO_IMAGE_SEED_OFFSET, FNELoss

DIM, BATCH, BANK = 8, 6, 20


def _unit(rows, generator):
    return torch.nn.functional.normalize(torch.randn(rows, DIM, generator=generator, dtype=torch.float64), dim=1)


def _set_stats(loss, mu_pos=0.3, var_pos=0.04, mu_neg=-0.1, var_neg=0.09, count=500):
    """Running statistics with chosen moments and enough positives for the Bayesian branch."""
    state = {}
    for name, mean, variance in (("positive", mu_pos, var_pos), ("negative", mu_neg, var_neg)):
        values = {"count": count, "total": mean * count, "squares": variance * (count - 1),
                  "ema_mean": 0.0, "ema_var": 0.0}
        state.update({f"{name}.{field}": torch.tensor(value, dtype=torch.float64) for field, value in values.items()})
    loss.stats.load_state_dict(state)


def _case(seed=0, bank_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 1, 2, 3, 3, 4])  # two pairs share image 3
    banks = []
    for _ in range(2):
        bank = MemoryBank(BANK, DIM, dtype=bank_dtype)
        bank.enqueue(_unit(BANK - 4, generator).float(), torch.randint(0, 8, (BANK - 4,), generator=generator))
        banks.append(bank)
    image, text = _unit(BATCH, generator), _unit(BATCH, generator)
    image_key, text_key = _unit(BATCH, generator), _unit(BATCH, generator)
    return ids, banks[0], banks[1], image, text, image_key, text_key


def _oracle_direction(anchors, positive_keys, ids, bank, stats, seed, step, mode, margin, k):
    """Triplet hinge over the reference sampler's choice, computed from the full float64 similarity matrix. The
    choice is made with the anchors in the bank's dtype, as FNELoss selects."""
    positive = (anchors * positive_keys).sum(dim=1)
    selecting = anchors.detach().to(bank.dtype).double()
    index, _, valid = sample_negatives_reference(
        selecting, bank.features.double(), positive.detach().float(), ids, bank.ids, stats, k=k, mode=mode,
        margin=margin, seed=seed, step=step, filled=bank.filled)
    sim = anchors @ bank.features.double().T
    chosen = torch.gather(sim, 1, index.clamp(min=0))
    hinge = (margin + chosen - positive.unsqueeze(1)).clamp(min=0) * valid
    return (hinge.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()


@pytest.mark.parametrize("mode", ["fne", "hardest", "uniform"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_bank_loss_and_gradients_match_the_oracle(mode, k, bank_dtype):
    ids, image_bank, text_bank, image, text, image_key, text_key = _case(bank_dtype=bank_dtype)
    loss_module = FNELoss(mode, SamplerOptions(k=k), seed=11)
    _set_stats(loss_module)
    stats = loss_module.stats.as_tensor()
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss, _ = loss_module(image, text, image_key, text_key, ids, image_bank=image_bank, text_bank=text_bank,
                          step=5, update_stats=False)
    gradients = torch.autograd.grad(loss, (image, text))
    expected = (_oracle_direction(image, text_key, ids, text_bank, stats, 11, 5, mode, 0.2, k)
                + _oracle_direction(text, image_key, ids, image_bank, stats, 11 + _TEXT_TO_IMAGE_SEED_OFFSET, 5,
                                    mode, 0.2, k))
    expected_gradients = torch.autograd.grad(expected, (image, text))
    assert loss.dtype == torch.float64 and loss.item() > 0
    torch.testing.assert_close(loss, expected)
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["fne", "inbatch-hardest"])
def test_gradcheck_float64(mode):
    ids, image_bank, text_bank, image, text, image_key, text_key = _case(seed=3)
    loss_module = FNELoss(mode, seed=2)
    _set_stats(loss_module)

    def loss_of(image, text):
        return loss_module(image, text, image_key, text_key, ids, image_bank=image_bank, text_bank=text_bank,
                           step=1, update_stats=False)[0]

    assert torch.autograd.gradcheck(loss_of, (image.requires_grad_(True), text.requires_grad_(True)))


def test_in_batch_max_violation_matches_a_loop():
    ids, _, _, image, text, _, _ = _case(seed=4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    loss_module = FNELoss("fne", SamplerOptions(margin=0.5))
    loss, diagnostics = loss_module(image, text, image, text, ids, warmup=True, update_stats=False)
    expected = image.new_zeros(())
    for transpose in (False, True):
        sim = (text @ image.T) if transpose else (image @ text.T)
        terms = []
        for i in range(BATCH):
            negatives = [sim[i, j] for j in range(BATCH) if ids[j] != ids[i]]
            terms.append((0.5 + torch.stack(negatives).max() - sim[i, i]).clamp(min=0))
        expected = expected + torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, (image, text)), torch.autograd.grad(expected, (image, text))):
        torch.testing.assert_close(got, want)
    assert diagnostics["slots"].item() == 2 * BATCH and diagnostics["fallback"].item() == 0


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_in_batch_term_adds_to_the_bank_term_with_its_weight(weight):
    ids, image_bank, text_bank, image, text, image_key, text_key = _case(seed=6)
    image.requires_grad_(True)
    text.requires_grad_(True)
    arguments = dict(image_bank=image_bank, text_bank=text_bank, step=2, update_stats=False)

    def loss_of(**loss_options):
        module = FNELoss(seed=5, **loss_options)
        _set_stats(module)
        return module(image, text, image_key, text_key, ids, **arguments)

    both, diagnostics = loss_of(inbatch_weight=weight)
    bank_only, bank_diagnostics = loss_of()
    in_batch, _ = loss_of(sampler="inbatch-hardest")
    expected = bank_only + weight * in_batch  # the oracles of both terms are test_bank_loss_… and test_in_batch_…
    torch.testing.assert_close(both, expected)
    for got, want in zip(torch.autograd.grad(both, (image, text)), torch.autograd.grad(expected, (image, text))):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(both, bank_only)
    torch.testing.assert_close(diagnostics["loss"], expected.detach())
    # The diagnostics of the draws stay the bank's: the in-batch choices are not counted as slots.
    assert diagnostics["slots"] == bank_diagnostics["slots"] and diagnostics["fallback"] == bank_diagnostics["fallback"]
    with pytest.raises(ValueError, match="inbatch_weight"):
        FNELoss(inbatch_weight=-1.0)


def test_cut_margin_moves_the_cut_down_and_not_the_hinge():
    # The hinge keeps margin 0.2 whatever the cut-down margin: the loss is the oracle's hinge over the draws of a
    # sampler whose cut-down is μ⁺ - 0.6.
    ids, image_bank, text_bank, image, text, image_key, text_key = _case(seed=8)
    module = FNELoss("uniform", SamplerOptions(cut_margin=0.6, k=3), seed=4)
    _set_stats(module, mu_pos=0.7)
    stats = module.stats.as_tensor()
    loss, _ = module(image, text, image_key, text_key, ids, image_bank=image_bank, text_bank=text_bank, step=1,
                     update_stats=False)

    def direction(anchors, keys, bank, seed, cut_margin):
        positive = (anchors * keys).sum(dim=1)
        index, _, valid = sample_negatives_reference(
            anchors.float().double(), bank.features.double(), positive.float(), ids, bank.ids, stats, k=3,
            mode="uniform", cut_margin=cut_margin, seed=seed, step=1, filled=bank.filled)
        chosen = torch.gather(anchors @ bank.features.double().T, 1, index.clamp(min=0))
        hinge = (0.2 + chosen - positive.unsqueeze(1)).clamp(min=0) * valid
        return (hinge.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()

    def expected(cut_margin):
        return (direction(image, text_key, text_bank, 4, cut_margin)
                + direction(text, image_key, image_bank, 4 + _TEXT_TO_IMAGE_SEED_OFFSET, cut_margin))

    torch.testing.assert_close(loss, expected(0.6))
    assert not torch.allclose(expected(0.6), expected(None))  # the cut-down margin changed the draws


def test_false_negative_rate_and_fallback_diagnostics():
    # Anchor 0's hardest bank candidate is a variant (same group, other identity); anchor 1's is not.
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    bank = MemoryBank(3, 2)
    bank.enqueue(torch.tensor([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.0]]), torch.tensor([2, 3, 4]))
    group_of_id = torch.tensor([0, 1, 0, 5, 6])  # ids 0 and 2 share group 0
    ids = torch.tensor([0, 1])
    loss_module = FNELoss("hardest")
    _set_stats(loss_module)
    _, diagnostics = loss_module(anchors, anchors, anchors, anchors, ids, image_bank=bank, text_bank=bank,
                                 group_of_id=group_of_id, update_stats=False)
    assert diagnostics["false_negatives"].item() == 2  # anchor 0 in both directions
    assert diagnostics["group_slots"].item() == 4
    # With μ⁺ = 2 every candidate is cut down (s <= μ⁺ - margin), so every FNE choice is a fallback.
    loss_module = FNELoss("fne")
    _set_stats(loss_module, mu_pos=2.0)
    _, diagnostics = loss_module(anchors, anchors, anchors, anchors, ids, image_bank=bank, text_bank=bank,
                                 group_of_id=group_of_id, update_stats=False)
    assert diagnostics["fallback"].item() == diagnostics["slots"].item() == 4
    assert diagnostics["group_slots"].item() == 4 and diagnostics["sampled_group_slots"].item() == 0


def test_rejects_unknown_sampler_and_missing_banks():
    with pytest.raises(ValueError, match="sampler must be one of"):
        FNELoss("softmax")
    ids, _, _, image, text, image_key, text_key = _case()
    with pytest.raises(ValueError, match="needs image_bank and text_bank"):
        FNELoss("fne")(image, text, image_key, text_key, ids)


_LOCAL_SIZES = {2: [4, 2], 3: [3, 0, 3]}  # uneven local batches, and a rank without pairs


def _in_batch_over_ranks(rank, world_size, batch_invariant):
    """This rank's share of the in-batch loss and statistics of the global batch of ``_case``, and the gradient of
    its returned loss with respect to its own pairs' embeddings."""
    import torch.distributed as dist

    ids, _, _, image, text, _, _ = _case(seed=4)
    sizes = _LOCAL_SIZES[world_size]
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    local_image, local_text = image[mine].clone().requires_grad_(True), text[mine].clone().requires_grad_(True)
    loss_module = FNELoss("fne", SamplerOptions(margin=0.5), group=dist.group.WORLD, batch_invariant=batch_invariant)
    loss, diagnostics = loss_module(local_image, local_text, local_image, local_text, ids[mine], warmup=True)
    gradients = torch.autograd.grad(loss, (local_image, local_text), allow_unused=True)
    return ([torch.zeros_like(local_image) if grad is None else grad for grad in gradients],
            diagnostics["loss"], loss_module.stats.as_tensor())


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_in_batch_loss_over_ranks_has_the_whole_batchs_gradients(world_size, batch_invariant):
    """Each rank scores its own rows and columns of the in-batch matrix; the negatives other ranks' anchors chose
    get their gradients on their own rank. Against one process's loss on the whole batch (float64): every pair's
    gradient (returned loss / W; batch-invariant: the returned loss's own, to the bit), the summed loss, and the
    statistics."""
    from fne_fast.sampling.launch import results_of, run_in_processes

    per_rank = results_of(run_in_processes(_in_batch_over_ranks, world_size, batch_invariant))
    ids, _, _, image, text, _, _ = _case(seed=4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    whole = FNELoss("fne", SamplerOptions(margin=0.5))
    expected, _ = whole(image, text, image, text, ids, warmup=True)
    wanted = torch.autograd.grad(expected, (image, text))
    for which in range(2):
        got = torch.cat([gradients[which] for gradients, _, _ in per_rank])
        if batch_invariant:
            assert torch.equal(got, wanted[which])
        else:
            torch.testing.assert_close(got / world_size, wanted[which], rtol=1e-12, atol=1e-14)
    assert sum(float(share) for _, share, _ in per_rank) == pytest.approx(float(expected.detach()), rel=1e-12)
    for _, _, stats in per_rank:
        torch.testing.assert_close(stats, whole.stats.as_tensor())


@pytest.mark.parametrize("attract_k", [1, 3])
def test_attraction_adds_the_excluded_candidates_as_positives_against_the_draws(attract_k):
    """FNC's attraction against a float64 oracle: the anchor's ``attract_k`` most similar non-positive rows, where
    above its relative ceiling, are positives against each drawn negative; the loss (and its gradients) are the
    plain loss's plus that term. Without the ceiling's mask the oracle differs, so the mask is what is tested."""
    ids, image_bank, text_bank, image, text, image_key, text_key = _case(seed=9)
    # Keys nearer their anchors, so that some anchors' most similar candidates lie above the ceiling, some below.
    image_key, text_key = (torch.nn.functional.normalize(key + anchor, dim=1) for key, anchor in
                           ((image_key, text), (text_key, image)))
    options = SamplerOptions(k=2, relative_cut=0.5)
    plain = FNELoss("uniform", options, seed=4)
    attracting = FNELoss("uniform", options, seed=4, attract_weight=0.7, attract_k=attract_k)
    for module in (plain, attracting):
        _set_stats(module, mu_pos=0.3)
    stats = plain.stats.as_tensor()
    image.requires_grad_(True)
    text.requires_grad_(True)
    arguments = dict(image_bank=image_bank, text_bank=text_bank, step=1, update_stats=False)
    base, _ = plain(image, text, image_key, text_key, ids, **arguments)
    total, sums = attracting(image, text, image_key, text_key, ids, **arguments)

    def direction(anchors, keys, bank, seed, masked_by_ceiling=True):
        positive = (anchors * keys).sum(dim=1)
        index, _, valid = sample_negatives_reference(
            anchors.float().double(), bank.features.double(), positive.float(), ids, bank.ids, stats, k=2,
            mode="uniform", relative_cut=0.5, seed=seed, step=1, filled=bank.filled)
        sim = anchors @ bank.features.double().T
        negative = torch.gather(sim, 1, index.clamp(min=0))
        unusable = (ids.unsqueeze(1) == bank.ids.unsqueeze(0)) | (torch.arange(BANK) >= bank.filled).unsqueeze(0)
        top, where = sim.detach().masked_fill(unusable, float("-inf")).topk(attract_k, dim=1)
        positive32 = positive.detach().float()
        ceiling = (positive32 - torch.tensor(0.5) * positive32.abs()).double()
        detected = torch.isfinite(top) & ((top > ceiling.unsqueeze(1)) | (not masked_by_ceiling))
        attracted = torch.gather(sim, 1, where)
        violation = (0.2 + negative.unsqueeze(1) - attracted.unsqueeze(2)).clamp(min=0)
        pairs = (detected.unsqueeze(2) & valid.unsqueeze(1)).double()
        return 0.7 * ((violation * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)).mean(), detected

    def expected(masked_by_ceiling=True):
        image_term, image_detected = direction(image, text_key, text_bank, 4, masked_by_ceiling)
        text_term, text_detected = direction(text, image_key, image_bank, 4 + _TEXT_TO_IMAGE_SEED_OFFSET,
                                             masked_by_ceiling)
        return image_term + text_term, int(image_detected.sum() + text_detected.sum())

    term, detected = expected()
    torch.testing.assert_close(total, base + term)
    for got, want in zip(torch.autograd.grad(total, (image, text)), torch.autograd.grad(base + term, (image, text))):
        torch.testing.assert_close(got, want)
    assert 0 < detected < 2 * BATCH * attract_k and sums["attracted"].item() == detected
    assert not torch.allclose(expected(masked_by_ceiling=False)[0], term)


def test_attraction_needs_a_criterion_and_sane_settings():
    with pytest.raises(ValueError, match="relative_cut or thresholds"):
        FNELoss(attract_weight=1.0)
    with pytest.raises(ValueError, match="attract_weight"):
        FNELoss("fne", SamplerOptions(relative_cut=0.9), attract_weight=float("inf"))
    with pytest.raises(ValueError, match="attract_k"):
        FNELoss("fne", SamplerOptions(relative_cut=0.9), attract_weight=1.0, attract_k=0)
