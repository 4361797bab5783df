"""Masked language modeling: masking proportions on real DNA, specials, determinism, the loss, the
held-out evaluation, RC augmentation, optimizer groups, and a tiny Caduceus-PS that learns."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM
from seqssm.tokenizers.dna import A, BOS, C, CLS, G, MASK, N, PAD, SEP, T, UNK, encode, reverse_complement
from seqssm.training.mlm import (
    IGNORE,
    CaduceusOptimConfig,
    MaskingConfig,
    batch_generator,
    evaluate_mlm,
    make_mlm_optimizer,
    mask_tokens,
    mlm_batch,
    mlm_loss,
    mlm_param_groups,
    no_context_baseline,
    no_weight_decay_names,
    rc_augment,
    reverse_complement_windows,
    wants_rc_augmentation,
)

from test_caduceus import small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lambda_windows(genome: str, n: int, L: int, start: int = 0) -> np.ndarray:
    return np.stack([encode(genome[start + i * L:start + (i + 1) * L]) for i in range(n)])


# ----------------------------------------------------------------------------------------------
# masking


def test_masking_proportions_on_lambda(lambda_genome):
    ids = torch.from_numpy(lambda_windows(lambda_genome, 11, 4096).astype(np.int64))  # 45,056 bases
    ids[0, 100:400] = N  # an N gap: eligible too
    ids[1, -300:] = PAD  # padding: never
    inputs, targets = mask_tokens(ids, torch.Generator().manual_seed(0))
    eligible = ids != PAD
    selected = targets != IGNORE
    n_sel = int(selected.sum())
    assert abs(n_sel / int(eligible.sum()) - 0.15) < 0.01  # sd of the fraction ~0.0017
    assert not (selected & ~eligible).any()
    assert torch.equal(targets[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes
    masked = selected & (inputs == MASK)
    changed = selected & (inputs != MASK) & (inputs != ids)
    kept = selected & (inputs == ids)
    assert abs(int(masked.sum()) / n_sel - 0.8) < 0.025
    # a random base equals the original a quarter of the time: 7.5% changed, 10% + 2.5% unchanged
    assert abs(int(changed.sum()) / n_sel - 0.075) < 0.02
    assert abs(int(kept.sum()) / n_sel - 0.125) < 0.02
    assert torch.isin(inputs[selected & (inputs != MASK)], torch.tensor([A, C, G, T, N])).all()
    assert torch.isin(inputs[changed], torch.tensor([A, C, G, T])).all()  # replacements are bases
    # each base is a replacement about equally often
    counts = torch.bincount(inputs[changed], minlength=11)[A:T + 1].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.06


def test_special_tokens_are_never_masked():
    specials = torch.tensor([CLS, SEP, BOS, MASK, PAD, 5, UNK])
    ids = torch.cat([specials, torch.tensor([A, C, G, T, N])]).repeat(4, 50)
    cfg = MaskingConfig(mlm_probability=1.0)
    inputs, targets = mask_tokens(ids, torch.Generator().manual_seed(1), cfg)
    is_special = torch.isin(ids, specials)
    assert (targets[is_special] == IGNORE).all() and torch.equal(inputs[is_special], ids[is_special])
    assert torch.equal(targets[~is_special], ids[~is_special])  # probability 1: every base is a target
    with pytest.raises(ValueError, match="never be masked"):
        MaskingConfig(eligible=(A, PAD))
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskingConfig(mlm_probability=0.0)
    with pytest.raises(TypeError, match="integer"):
        mask_tokens(ids.float())


def test_masking_is_deterministic(lambda_genome):
    ids = torch.from_numpy(lambda_windows(lambda_genome, 4, 1000).astype(np.int64))
    a = mask_tokens(ids, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # batch_generator is a pure function of (seed, step, micro)
    d = mask_tokens(ids, batch_generator(3, 10, 1))
    e = mask_tokens(ids, batch_generator(3, 10, 1))
    f = mask_tokens(ids, batch_generator(3, 11, 1))
    assert torch.equal(d[1], e[1]) and not torch.equal(d[1], f[1])
    # the result depends on the generator, not on the global RNG
    torch.manual_seed(123)
    g1 = mask_tokens(ids, torch.Generator().manual_seed(5))
    assert torch.equal(g1[0], a[0])


def test_loss_equals_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5], [0.3, -0.2, 0.1]]])
    targets = torch.tensor([[0, IGNORE, 2, 1]])

    def nll(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    rows = logits[0].tolist()
    want = [nll(rows[0], 0), nll(rows[2], 2), nll(rows[3], 1)]
    assert mlm_loss(logits, targets).item() == pytest.approx(sum(want) / 3, rel=1e-6)
    assert mlm_loss(logits, targets, "sum").item() == pytest.approx(sum(want), rel=1e-6)
    per = mlm_loss(logits, targets, "none")
    assert per.shape == (1, 4) and per[0, 1] == 0 and per[0, 2].item() == pytest.approx(want[1], rel=1e-6)
    assert mlm_loss(logits, torch.full_like(targets, IGNORE)).item() == 0.0


class AlwaysG(nn.Module):
    """Logits that ignore the input: log-probabilities log_p for every position."""

    def __init__(self, log_p):
        super().__init__()
        self.log_p = torch.tensor(log_p)

    def forward(self, x):
        return self.log_p.expand(*x.shape, -1).clone()


def test_evaluation_counts_masked_bases_only(lambda_genome):
    windows = lambda_windows(lambda_genome, 6, 500, start=40000)
    windows[2, 50:150] = N
    p = np.full(16, 1e-3)
    p[[A, C, G, T]] = [0.2, 0.2, 0.4, 0.2 - 1e-3 * 12]
    model = AlwaysG(np.log(p).tolist())
    res = evaluate_mlm(model, windows, batch_size=4, seed=9)
    # the same masks, by hand
    targets = torch.stack([mask_tokens(torch.from_numpy(w.astype(np.int64)), batch_generator(9, i))[1]
                           for i, w in enumerate(windows)])
    counted = torch.isin(targets, torch.tensor([A, C, G, T]))
    t = targets[counted]
    assert res["targets"] == int(counted.sum()) and res["windows"] == 6
    assert res["excluded_n_targets"] == int((targets == N).sum()) > 0
    assert res["loss"] == pytest.approx(float(-np.log(p)[t.numpy()].mean()), rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["masked_accuracy"] == pytest.approx(float((t == G).float().mean()))
    # masks do not depend on the batch size
    one = evaluate_mlm(model, windows, batch_size=1, seed=9)
    assert one["targets"] == res["targets"] and one["loss"] == pytest.approx(res["loss"], rel=1e-6)
    assert evaluate_mlm(model, windows, batch_size=4, seed=10)["targets"] != res["targets"]


# ----------------------------------------------------------------------------------------------
# RC augmentation


def test_reverse_complement_windows_keep_the_frame():
    body = [A, A, C, G, N, T, MASK, G]
    rc_body = [C, MASK, A, N, C, G, T, T]
    ids = torch.tensor([[CLS] + body + [SEP, PAD, PAD],
                        body + [PAD] * 4,
                        [BOS, CLS] + body + [SEP, PAD]])
    out = reverse_complement_windows(ids)
    assert out.tolist() == [[CLS] + rc_body + [SEP, PAD, PAD],
                            rc_body + [PAD] * 4,
                            [BOS, CLS] + rc_body + [SEP, PAD]]
    assert torch.equal(reverse_complement_windows(out), ids)  # an involution
    # explicit lengths: positions from the length on stay
    out_len = reverse_complement_windows(ids[1:2], torch.tensor([5]))
    assert out_len.tolist() == [[N, C, G, T, T, T, MASK, G, PAD, PAD, PAD, PAD]]
    assert out.dtype == ids.dtype


def test_rc_augment_on_real_dna(lambda_genome):
    ids = torch.from_numpy(lambda_windows(lambda_genome, 64, 200).astype(np.int64))
    out, flipped = rc_augment(ids, torch.Generator().manual_seed(2))
    assert 16 <= int(flipped.sum()) <= 48  # p = 0.5 of 64 rows
    assert torch.equal(out[flipped], reverse_complement(ids[flipped]))  # plain windows: the tokenizer's rc
    assert torch.equal(out[~flipped], ids[~flipped])
    assert rc_augment(ids, torch.Generator().manual_seed(2), p=1.0)[1].all()
    assert not rc_augment(ids, torch.Generator().manual_seed(2), p=0.0)[1].any()
    # training batches: rc, then masking, deterministic given the generator
    x1 = mlm_batch(ids, torch.Generator().manual_seed(4), rc_aug=True)
    x2 = mlm_batch(ids, torch.Generator().manual_seed(4), rc_aug=True)
    assert torch.equal(x1[0], x2[0]) and torch.equal(x1[1], x2[1])
    assert wants_rc_augmentation(CaduceusConfig.from_dict(small_config(rcps=False)))
    assert not wants_rc_augmentation(CaduceusConfig.from_dict(small_config()))


# ----------------------------------------------------------------------------------------------
# optimizer


def test_param_groups_follow_the_caduceus_recipe():
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(small_config()))
    exempt = no_weight_decay_names(model)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        want = (leaf in ("A_log", "D", "bias") or ".norm" in name or "norm_f" in name
                or "word_embeddings" in name or name.startswith("lm_head"))
        assert (name in exempt) == want, name
    groups = mlm_param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})  # tied ones once
    decayed = {id(p) for p in groups[0]["params"]}
    mixer = model.caduceus.backbone.layers[0].mixer.submodule.mamba_fwd
    assert id(mixer.in_proj.weight) in decayed and id(mixer.x_proj.weight) in decayed
    assert id(mixer.A_log) not in decayed and id(mixer.dt_proj.bias) not in decayed
    cfg = CaduceusOptimConfig()
    opt = make_mlm_optimizer(model, cfg)
    assert opt.defaults["lr"] == 8e-3 and opt.defaults["betas"] == (0.9, 0.95)
    assert cfg.weight_decay == 0.1 and cfg.warmup_steps(10000) == 1000


def test_no_context_baseline_matches_a_simulation_on_lambda(lambda_genome):
    """The analytic reference equals the Bayes predictor that sees only the masked token, scored on
    masks drawn by mask_tokens (about 60,000 masked held-out bases)."""
    train = encode(lambda_genome[:30000])
    held = lambda_windows(lambda_genome, 18, 1000, start=30000)
    ref = no_context_baseline([train], held)
    p = np.array([ref["base_frequencies"][b] for b in "ACGT"])
    inputs, targets = mask_tokens(torch.from_numpy(np.tile(held, (22, 1)).astype(np.int64)),
                                  torch.Generator().manual_seed(0))
    sel = targets != IGNORE
    shown, true = inputs[sel].numpy(), targets[sel].numpy() - A
    post = p[None, :] * (0.1 * np.eye(4) + 0.1 / 4)
    post /= post.sum(1, keepdims=True)
    probs = np.where((shown == MASK)[:, None], p[None, :], post[np.clip(shown - A, 0, 3)])
    assert len(true) > 50_000
    assert ref["masked_accuracy"] == pytest.approx(float((probs.argmax(1) == true).mean()), abs=0.006)
    assert ref["loss"] == pytest.approx(float(-np.log(probs[np.arange(len(true)), true]).mean()), abs=0.006)
    # ... and it is above the frequency of the most common base: 10% of the masked bases are shown as they are
    counts = np.bincount(held.ravel(), minlength=12)[A:T + 1] / held.size
    assert ref["masked_accuracy"] > counts.max() + 0.03


# ----------------------------------------------------------------------------------------------
# a tiny Caduceus-PS learns


def test_tiny_caduceus_ps_learns_on_lambda(lambda_genome):
    torch.manual_seed(0)
    cfg = copy.deepcopy(small_config())  # Caduceus-PS, d_model 32, 2 layers, d_state 8
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(cfg))
    L = 128
    train = lambda_windows(lambda_genome, (40000 // L), L)  # bases 0..40k
    held_out = lambda_windows(lambda_genome, 48, L, start=42000)  # bases 42k..48k
    before = evaluate_mlm(model, held_out, batch_size=8, seed=1)
    opt = make_mlm_optimizer(model, CaduceusOptimConfig(lr=8e-3))
    rng = np.random.default_rng(0)
    model.train()
    for step in range(60):
        rows = torch.from_numpy(train[rng.choice(len(train), 8, replace=False)].astype(np.int64))
        inputs, targets = mlm_batch(rows, batch_generator(0, step), rc_aug=wants_rc_augmentation(model.config))
        loss = mlm_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = evaluate_mlm(model, held_out, batch_size=8, seed=1)
    assert before["targets"] == after["targets"] > 800
    assert before["loss"] > 2.5  # about log(16): uniform over the padded vocabulary at init
    # below the entropy of lambda's base composition (1.384 nats, unigram accuracy 0.26): it uses
    # the context, not just the base frequencies
    counts = np.bincount(held_out.ravel(), minlength=12)[A:T + 1] / held_out.size
    assert after["loss"] < -(counts * np.log(counts)).sum() - 0.03
    assert after["masked_accuracy"] > counts.max() + 0.05
