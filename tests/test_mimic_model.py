"""MIMIC's matcher (nel_model.mimic) and its loss: unit shapes, masking of missing images and padded tokens, chunked
and per-candidate scoring equal to whole scoring, the official loss on a hand-computed batch, and learning."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from nel_model.losses import mimic_loss_sum
from nel_model.mimic import MIMIC, EntitySide, MIMICConfig, pair_bytes, pair_flops

B, E, L, R, DT, DI = 4, 6, 7, 4, 16, 12


def views(side, n, seed, length=L, dt=DT, di=DI, dtype=torch.float16):
    """Random batch views of one side (``"mention"`` or ``"entity"``) with random token lengths and every image."""
    g = torch.Generator().manual_seed(seed)
    pooled, tokens = ("context", "sentence") if side == "mention" else ("desc", "desc_tokens")
    lengths = torch.randint(1, length + 1, (n, 1), generator=g)
    return {pooled: torch.randn(n, dt, generator=g).to(dtype),
            tokens: torch.randn(n, length, dt, generator=g).to(dtype),
            tokens + "_mask": torch.arange(length)[None, :] < lengths,
            "image": torch.randn(n, di, generator=g).to(dtype), "image_mask": torch.ones(n, dtype=torch.bool),
            "regions": torch.randn(n, R, di, generator=g).to(dtype), "regions_mask": torch.ones(n, R, dtype=torch.bool)}


def mention_views(seed=0, b=B, length=L):
    return views("mention", b, seed, length)


def entity_views(seed=1, e=E, length=L):
    return views("entity", e, seed, length)


def without_image(views, row):
    """Row ``row`` has no image: its masks off and its features zero, as the feature cache writes it."""
    v = {k: x.clone() for k, x in views.items()}
    v["image_mask"][row] = False
    v["regions_mask"][row] = False
    v["image"][row] = 0
    v["regions"][row] = 0
    return v


def make(**kw):
    torch.manual_seed(0)
    cfg = MIMICConfig(text_dim=DT, image_dim=DI, hidden=8, dv=10, text_len=L, **kw)
    return MIMIC(cfg).eval()


def scores(model, mv, ev, candidates=None):
    with torch.no_grad():
        units = model.unit_scores(model.encode_mentions(mv), model.encode_entities(ev), candidates)
    return model.overall(units), units


def test_unit_shapes_and_sides():
    model = make()
    ms, es = model.encode_mentions(mention_views()), model.encode_entities(entity_views())
    assert ms.keys.shape == (B, L, 9) and es.queries.shape == (E, L, 9) and es.fused.shape == (E, 8)   # H + mask
    assert len(ms) == B and len(es) == E and len(es.rows(slice(1, 3))) == 2
    overall, units = scores(model, mention_views(), entity_views())
    assert set(units) == {"text", "image", "fusion"}
    assert overall.shape == (B, E) and all(u.shape == (B, E) for u in units.values())
    assert torch.allclose(overall, (units["text"] + units["image"] + units["fusion"]) / 3)
    assert all(torch.isfinite(u).all() for u in units.values())


def test_views_follow_the_units():
    full = make().cfg
    assert full.mention_views() == ("context", "sentence", "image", "regions")
    assert full.entity_views() == ("desc", "desc_tokens", "image", "regions")
    text = MIMICConfig(text_dim=DT, image_dim=0, use_image_unit=False, use_fusion_unit=False)
    assert text.mention_views() == ("context", "sentence") and text.entity_views() == ("desc", "desc_tokens")
    fusion = MIMICConfig(text_dim=DT, image_dim=DI, use_text_unit=False, use_image_unit=False,
                         global_image_token=False)
    assert fusion.mention_views() == ("context", "regions") and fusion.entity_views() == ("desc", "regions")


def test_config_rejects_image_units_without_images_and_no_units():
    with pytest.raises(ValueError, match="image_dim 0"):
        MIMICConfig(text_dim=DT, image_dim=0)
    with pytest.raises(ValueError, match="at least one unit"):
        MIMICConfig(text_dim=DT, image_dim=DI, use_text_unit=False, use_image_unit=False, use_fusion_unit=False)
    with pytest.raises(ValueError, match="missing_image"):
        MIMICConfig(text_dim=DT, image_dim=DI, missing_image="zero")


def test_text_only_model_reads_no_image_view():
    model = make(use_image_unit=False, use_fusion_unit=False)
    mv = {k: v for k, v in mention_views().items() if k in ("context", "sentence", "sentence_mask")}
    ev = {k: v for k, v in entity_views().items() if k in ("desc", "desc_tokens", "desc_tokens_mask")}
    overall, units = scores(model, mv, ev)
    assert set(units) == {"text"} and torch.equal(overall, units["text"])


def test_mention_without_image():
    model = make()
    mv = without_image(mention_views(), 1)
    _, units = scores(model, mv, entity_views())
    assert torch.equal(units["image"][1], torch.zeros(E))          # the image unit has nothing to compare
    assert units["image"][[0, 2, 3]].abs().min() > 0
    # its (masked) image features change nothing, in any unit
    other = {k: v.clone() for k, v in mv.items()}
    other["image"][1] = torch.randn(DI).half()
    other["regions"][1] = torch.randn(R, DI).half()
    overall2, units2 = scores(model, other, entity_views())
    overall1, _ = scores(model, mv, entity_views())
    assert torch.equal(overall1, overall2) and torch.equal(units["fusion"], units2["fusion"])
    # its fusion vector is its gated text alone: equal to the vector of a mention whose image is masked token by
    # token (the same mention, image present but every region and the global token masked out)
    no_tokens = {k: v.clone() for k, v in mention_views().items()}
    no_tokens["regions_mask"][1] = False
    with torch.no_grad():
        a = model.encode_mentions(mv).fused[1]
        model_no_global = make(global_image_token=False)
        model_no_global.load_state_dict(model.state_dict())
        b = model_no_global.encode_mentions(no_tokens).fused[1]
    assert torch.allclose(a, b, atol=1e-6)


def test_entity_without_image():
    model = make()
    ev = without_image(entity_views(), 2)
    _, units = scores(model, mention_views(), ev)
    assert torch.equal(units["image"][:, 2], torch.zeros(B))
    other = {k: v.clone() for k, v in ev.items()}
    other["image"][2] = torch.randn(DI).half()
    other["regions"][2] = torch.randn(R, DI).half()
    o1, _ = scores(model, mention_views(), ev)
    o2, _ = scores(model, mention_views(), other)
    assert torch.equal(o1, o2)


def test_blank_image_flag_feeds_the_missing_image_like_the_official_code():
    model = make(missing_image="blank")
    mv = without_image(mention_views(), 1)
    _, units = scores(model, mv, entity_views())
    assert units["image"][1].abs().min() > 0          # the zero row is scored like an image
    other = {k: v.clone() for k, v in mv.items()}
    other["image"][1] = torch.randn(DI).half()
    _, units2 = scores(model, other, entity_views())
    assert not torch.allclose(units["image"][1], units2["image"][1])


def test_padded_tokens_change_nothing():
    model = make()
    mv, ev = mention_views(), entity_views()
    o1, _ = scores(model, mv, ev)
    mv2, ev2 = dict(mv), dict(ev)
    mv2["sentence"] = torch.where(mv["sentence_mask"].unsqueeze(-1), mv["sentence"], torch.full_like(mv["sentence"], 7))
    ev2["desc_tokens"] = torch.where(ev["desc_tokens_mask"].unsqueeze(-1), ev["desc_tokens"],
                                     torch.randn(ev["desc_tokens"].shape).half())
    o2, _ = scores(model, mv2, ev2)
    assert torch.equal(o1, o2)
    # more padding positions (another cache's token length): the same scores up to float rounding
    pad = 3
    mv3, ev3 = dict(mv), dict(ev)
    for views, key in ((mv3, "sentence"), (ev3, "desc_tokens")):
        views[key] = F.pad(views[key], (0, 0, 0, pad), value=5.0)
        views[key + "_mask"] = F.pad(views[key + "_mask"], (0, pad), value=False)
    longer = make()
    longer.cfg.text_len = L + pad
    o3, _ = scores(longer, mv3, ev3)
    assert torch.allclose(o1, o3, atol=1e-5)


def test_official_padding_flag_lets_padded_tokens_count():
    model = make(mask_padding=False)
    mv = mention_views()
    mv["sentence_mask"][0, -1] = False          # one padded position with a non-zero feature
    o1, _ = scores(model, mv, entity_views())
    mv2 = dict(mv)
    mv2["sentence"] = mv["sentence"].clone()
    mv2["sentence"][0, -1] = 3.0
    o2, _ = scores(model, mv2, entity_views())
    assert not torch.allclose(o1[0], o2[0]) and torch.equal(o1[1:], o2[1:])


def test_tokens_beyond_text_len_are_ignored():
    model = make()
    model.cfg.text_len = 4
    mv = mention_views()
    o1, _ = scores(model, mv, entity_views())
    mv2 = dict(mv)
    mv2["sentence"] = mv["sentence"].clone()
    mv2["sentence"][:, 4:] = 9.0
    o2, _ = scores(model, mv2, entity_views())
    assert torch.equal(o1, o2)


def test_rows_without_any_token_or_image_are_finite():
    model = make()
    mv, ev = without_image(mention_views(), 0), without_image(entity_views(), 0)
    mv["sentence_mask"][0] = False
    ev["desc_tokens_mask"][0] = False
    model.train()
    ms, es = model.encode_mentions(mv), model.encode_entities(ev)
    units = model.unit_scores(ms, es)
    loss = mimic_loss_sum(model.overall(units)[:, :B], {k: u[:, :B] for k, u in units.items()}, 0, B)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # no tokens on either side: the text unit is the global-to-global half alone
    g2g = ms.text[0] @ es.text.T
    assert torch.allclose(units["text"][0, 0], g2g[0] / 2, atol=1e-5)
    assert torch.allclose(units["text"][:, 0], (ms.text @ es.text[0]) / 2, atol=1e-5)


def test_chunked_scoring_equals_whole_and_single_pairs():
    model = make()
    mv, ev = without_image(mention_views(), 3), without_image(entity_views(), 4)
    with torch.no_grad():
        ms, es = model.encode_mentions(mv), model.encode_entities(ev)
        whole = model.pair_scores(ms, es)
        by_entities = torch.cat([model.pair_scores(ms, es.rows(slice(i, i + 4))) for i in range(0, E, 4)], 1)
        by_mentions = torch.cat([model.pair_scores(ms.rows(slice(i, i + 3)), es) for i in range(0, B, 3)], 0)
        single = torch.tensor([[model.pair_scores(ms.rows(slice(b, b + 1)), es.rows(slice(e, e + 1))).item()
                                for e in range(E)] for b in range(B)])
    assert torch.allclose(whole, by_entities, atol=1e-5)
    assert torch.allclose(whole, by_mentions, atol=1e-5)
    with torch.no_grad():      # a KB encoded in blocks and put together scores as one encoded whole
        blocks = [model.encode_entities({k: v[i:i + 4] for k, v in ev.items()}) for i in range(0, E, 4)]
        assert torch.allclose(whole, model.pair_scores(ms, EntitySide.cat(blocks)), atol=1e-5)
    assert torch.allclose(whole, single, atol=1e-5)
    # with gradients recorded (the softmax is not done in place) the same scores
    ms_g, es_g = model.encode_mentions(mv), model.encode_entities(ev)
    assert torch.allclose(whole, model.pair_scores(ms_g, es_g).detach(), atol=1e-5)


def test_candidate_scores_equal_the_whole_kb_scores_at_those_entities():
    model = make()
    ev = without_image(entity_views(), 1)
    g = torch.Generator().manual_seed(3)
    candidates = torch.randint(0, E, (B, 5), generator=g)
    whole, whole_units = scores(model, mention_views(), ev)
    picked, units = scores(model, mention_views(), ev, candidates)
    assert picked.shape == (B, 5)
    assert torch.allclose(picked, whole.gather(1, candidates), atol=1e-5)
    for k in units:
        assert torch.allclose(units[k], whole_units[k].gather(1, candidates), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        scores(model, mention_views(), ev, candidates[:2])


class _LiveTensors(TorchDispatchMode):
    """The peak bytes of the tensors alive at once among those allocated by operations inside the mode (views of
    tensors made before it do not count)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in inputs and key not in self.live:
                    continue                   # a view of, or a write into, a tensor made before the mode
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                weakref.finalize(t, self._release, key)
        return out


@pytest.mark.parametrize("units", [{}, {"use_image_unit": False, "use_fusion_unit": False},
                                   {"use_text_unit": False, "use_fusion_unit": False}])
def test_memory_of_one_call_is_bounded_by_pair_bytes(units):
    b, e, length, dt, di = 6, 40, 24, 32, 16
    model = MIMIC(MIMICConfig(text_dim=dt, image_dim=di, text_len=length, **units)).eval()   # hidden 96, dv 96
    mv = views("mention", b, 0, length, dt, di, torch.float32)
    ev = views("entity", e, 1, length, dt, di, torch.float32)
    g = torch.Generator().manual_seed(2)
    # the logits of the token positions some row uses (the model cuts off padding past the block's longest row)
    attention = b * e * int(mv["sentence_mask"].sum(1).max()) * int(ev["desc_tokens_mask"].sum(1).max()) * 4
    with torch.no_grad():
        ms, es = model.encode_mentions(mv), model.encode_entities(ev)
        for candidates in (None, torch.randint(0, e, (b, e), generator=g)):
            mode = _LiveTensors()
            with mode:
                model.pair_scores(ms, es, candidates)
            bound = pair_bytes(b, e, length, length, 96, model.cfg.units, candidates=candidates is not None,
                               text_dim=dt)
            # the measure sees the attention logits, and the bound holds without being loose by more than 2x
            floor = attention if model.cfg.use_text_unit else 1
            assert floor <= mode.peak <= bound < 2 * mode.peak, (mode.peak, bound)
    assert pair_bytes(2 * b, e, length, length) == 2 * pair_bytes(b, e, length, length)
    assert pair_bytes(b, e, length, length, grad=True) > 2 * b * e * length * length * 4


def test_flops_formula_covers_the_matrix_products():
    b, e, length, dt = 3, 5, 10, 32
    model = MIMIC(MIMICConfig(text_dim=dt, image_dim=DI, text_len=length)).eval()
    mv, ev = views("mention", b, 0, length, dt), views("entity", e, 1, length, dt)
    with torch.no_grad():
        ms, es = model.encode_mentions(mv), model.encode_entities(ev)
        with FlopCounterMode(display=False) as counter:
            model.pair_scores(ms, es)
    per_pair = counter.get_total_flops() / (b * e)
    formula = pair_flops(length, length, 96, dt)
    # the formula adds the element-wise work (softmax, layer norms, gates) to the products the counter sees
    assert per_pair <= formula < 1.25 * per_pair, (per_pair, formula)


def test_official_loss_on_a_hand_computed_batch():
    overall = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    units = {"text": torch.tensor([[0.0, 0.0], [3.0, 0.0]]),
             "image": torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
             "fusion": torch.tensor([[0.0, -1.0], [0.5, 0.5]])}
    # cross-entropy of row i with target i: log(sum_j exp s_ij) - s_ii
    expected = (math.log(math.exp(2) + 1) - 2) + math.log(2)              # overall
    expected += math.log(2) + (math.log(math.exp(3) + 1) - 0)             # text
    expected += (math.log(math.exp(1) + math.exp(2)) - 1) + math.log(2)   # image
    expected += (math.log(1 + math.exp(-1)) - 0) + math.log(2)            # fusion
    assert mimic_loss_sum(overall, units, 0, 2).item() == pytest.approx(expected, rel=1e-6)
    # the same terms from a sequence of unit scores
    assert mimic_loss_sum(overall, list(units.values()), 0, 2).item() == pytest.approx(expected, rel=1e-6)
    # this process holds mention 1 of the global batch only: its gold is column 1
    local = mimic_loss_sum(overall[1:], [u[1:] for u in units.values()], 1, 2).item()
    assert local == pytest.approx(math.log(2) + math.log(math.exp(3) + 1) + math.log(2) + math.log(2), rel=1e-6)


def test_official_loss_keeps_copies_of_the_gold_unless_asked():
    # both mentions have the same gold entity (KB row 7): the code counts the other copy as a negative
    overall = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    kept = mimic_loss_sum(overall, [], 0, 2).item()
    assert kept == pytest.approx((math.log(math.exp(2) + math.exp(1)) - 2) + (math.log(1 + math.exp(3)) - 3))
    masked = mimic_loss_sum(overall, [], 0, 2, entity_rows=torch.tensor([7, 7])).item()
    assert masked == pytest.approx(0.0, abs=1e-7)      # each row's only remaining logit is its gold


def _toy_batch(g, n, mix):
    """Mentions and their gold entities share a latent vector; every view of either side is its own random linear
    map of it, plus noise (token lengths and images as :func:`views` draws them)."""
    z = torch.randn(n, next(iter(mix.values())).shape[0], generator=g)
    out = []
    for side in ("mention", "entity"):
        v = views(side, n, int(torch.randint(0, 10**6, (), generator=g)), dtype=torch.float32)
        for key, w in mix.items():
            if key[0] == side:
                x = torch.einsum("nz,z...->n...", z, w)
                v[key[1]] = x + 0.3 * torch.randn(x.shape, generator=g)
        out.append(v)
    return out


def test_model_learns_a_toy_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    latent, n = 6, 32
    mix = {(side, key): torch.randn(latent, *x.shape[1:], generator=g)
           for side in ("mention", "entity") for key, x in views(side, 1, 0).items() if not key.endswith("_mask")}
    model = MIMIC(MIMICConfig(text_dim=DT, image_dim=DI, hidden=16, dv=16, text_len=L))
    held_out = _toy_batch(g, 256, mix)

    def accuracy():
        model.eval()
        with torch.no_grad():
            overall = model(*held_out)[0]
        model.train()
        return (overall.argmax(1) == torch.arange(256)).float().mean().item()

    before = accuracy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        overall, units = model(*_toy_batch(g, n, mix))
        loss = mimic_loss_sum(overall, units, 0, n) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    # chance is 1/256; the raw features of the two sides are unrelated maps of the latent, so the untrained model
    # is near chance and only learned projections can match them
    assert before < 0.1 and after > 0.5, (before, after)
