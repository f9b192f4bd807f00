"""Speculative decoding: the inference path equals training, the loop equals the target's greedy
output, the rejection rule samples from the target, and `talon eval` reports real numbers."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError
from stage_train.core import Eagle3TrainerModule, _shift_left_with_zero
from stage_train.draft import DraftConfig, Eagle3DraftModel
from stage_train.draft_inference import DraftProposal, Eagle3DraftRunner
from stage_train.speculative import (
    AcceptanceStats,
    eos_token_ids,
    speculative_generate,
    target_generate,
    verify_greedy,
    verify_sampling,
)


# ------------------------------------------------------------------ a small random draft
def small_draft(seed: int = 0) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    cfg = DraftConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rms_norm_eps=1e-6, vocab_size=100, draft_vocab_size=40, target_hidden_size=24,
        max_position_embeddings=256, rope_theta=10000.0,
    )
    draft = Eagle3DraftModel(cfg)
    draft.set_vocab_mapping(torch.sort(torch.randperm(100)[:40]).values)
    with torch.no_grad():
        for param in draft.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)  # large enough that logits differ clearly between slots
    return draft.eval()


def training_logits(draft: Eagle3DraftModel, x: torch.Tensor, aux: torch.Tensor, ttt_steps: int) -> list[torch.Tensor]:
    """Per-step draft logits [B, T, V_d] of the *training* module's unroll on sequence ``x``."""
    recorded: list[torch.Tensor] = []
    original = draft.compute_logits

    def record(hidden):
        logits = original(hidden)
        recorded.append(logits.detach())
        return logits

    module = Eagle3TrainerModule(
        draft, selected_token_ids=draft.draft_to_target_ids(), selected_token_mask=draft.t2d, ttt_steps=ttt_steps
    )
    draft.compute_logits = record
    try:
        with torch.no_grad():
            b, t = x.shape
            module(_shift_left_with_zero(x), torch.ones(b, t, dtype=torch.long), torch.ones(b, t), aux,
                   torch.randn(b, t, draft.config.vocab_size))
    finally:
        del draft.compute_logits
    assert len(recorded) == ttt_steps
    return recorded


def test_first_drafted_logits_equal_training_step0_at_every_position():
    draft = small_draft()
    torch.manual_seed(1)
    seq, x = 14, torch.randint(0, 100, (1, 14))
    aux = torch.randn(1, seq, 72)
    step0 = training_logits(draft, x, aux, ttt_steps=1)[0]
    runner = Eagle3DraftRunner(draft)
    # Extend in uneven chunks: the prefix cache must make chunking invisible.
    outs = [runner.extend(aux[:, a:b], x[:, a + 1:b + 1]) for a, b in ((0, 1), (1, 6), (6, 7), (7, seq - 1))]
    logits = runner.logits(torch.cat(outs, dim=1))
    assert runner.prefix_length == seq - 1
    torch.testing.assert_close(logits, step0[:, : seq - 1], atol=2e-5, rtol=1e-5)
    # Not vacuous: neighbouring slots really differ.
    assert (step0[0, 1:] - step0[0, :-1]).abs().max() > 0.1


def test_chain_step_k_equals_training_unroll_step_k_for_the_same_slot():
    draft = small_draft(seed=3)
    torch.manual_seed(4)
    seq, ttt = 12, 4
    x = torch.randint(0, 100, (1, seq))
    aux = torch.randn(1, seq, 72)
    steps = training_logits(draft, x, aux, ttt_steps=ttt)
    runner = Eagle3DraftRunner(draft)
    checked = 0
    for t in range(seq - 1):
        runner.reset()
        hidden = runner.extend(aux[:, : t + 1], x[:, 1 : t + 2])[:, -1:]
        chain: list = []
        for k in range(1, ttt):
            if t + k + 1 > seq - 1:
                break  # training feeds zero-filled ids past the end
            hidden = runner.chain_step(x[:, t + k + 1 : t + k + 2], hidden, t + k, chain)
            torch.testing.assert_close(runner.logits(hidden)[0, 0], steps[k][0, t], atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked == sum(min(ttt - 1, seq - 2 - t) for t in range(seq - 1))
    # A chain that ignored its own earlier keys would equal step-0 logits; it must not.
    assert (steps[2][0, 3] - steps[0][0, 3]).abs().max() > 0.1


def test_propose_maps_draft_ids_through_d2t_and_feeds_its_own_tokens_back():
    draft = small_draft(seed=5)
    torch.manual_seed(6)
    aux, x = torch.randn(1, 7, 72), torch.randint(0, 100, (1, 7))
    runner = Eagle3DraftRunner(draft)
    hidden = runner.extend(aux, x)[:, -1:]
    proposal = runner.propose(4)
    assert proposal.probs is None and proposal.token_ids.shape == (4,)
    d2t_targets = draft.draft_to_target_ids()
    chain: list = []
    for depth in range(4):
        expected = d2t_targets[runner.logits(hidden)[0, 0].argmax()]
        assert int(proposal.token_ids[depth]) == int(expected)
        assert bool(draft.t2d[expected])
        hidden = runner.chain_step(proposal.token_ids[depth].view(1, 1), hidden, 6 + depth + 1, chain)
    assert runner.prefix_length == 7  # chain keys never enter the prefix cache

    sampled = runner.propose(3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.probs.shape == (3, 100)
    torch.testing.assert_close(sampled.probs.sum(-1), torch.ones(3))
    assert bool((sampled.probs[:, ~draft.t2d] == 0).all())
    assert bool((sampled.probs[torch.arange(3), sampled.token_ids] > 0).all())


# ------------------------------------------------------------------ verification rules
def test_verify_greedy_accepts_the_matching_prefix_and_returns_the_target_token():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 9]):
        logits[row, best] = 1.0
    assert verify_greedy(torch.tensor([3, 5, 7]), logits) == (3, 9)
    assert verify_greedy(torch.tensor([3, 6, 7]), logits) == (1, 5)
    assert verify_greedy(torch.tensor([4, 5, 7]), logits) == (0, 3)


def test_rejection_rule_reproduces_the_target_distribution():
    """Two-token toy: the emitted pair is distributed as p(x1) p(x2 | x1), whatever q is."""
    gen = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.40, 0.25, 0.20, 0.15, 0.00])
    p2 = torch.tensor([
        [0.10, 0.60, 0.10, 0.10, 0.10],
        [0.50, 0.05, 0.05, 0.20, 0.20],
        [0.25, 0.25, 0.25, 0.25, 0.00],
        [0.00, 0.00, 0.30, 0.30, 0.40],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ])
    # The draft puts mass where the target has none and none on token 0 at depth 1 (a reduced
    # draft vocab), so only a correct rule can recover p.
    q1 = torch.tensor([0.00, 0.20, 0.20, 0.30, 0.30])
    q2 = torch.tensor([
        [0.20, 0.20, 0.20, 0.20, 0.20],
        [0.05, 0.05, 0.50, 0.20, 0.20],
        [0.10, 0.10, 0.10, 0.10, 0.60],
        [0.40, 0.30, 0.10, 0.10, 0.10],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ])
    bonus = torch.full((5,), 0.2)
    n = 20000
    counts = torch.zeros(5, 5)
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=gen))
        d2 = int(torch.multinomial(q2[d1], 1, generator=gen))
        accepted, nxt = verify_sampling(torch.tensor([d1, d2]), torch.stack([q1, q2[d1]]),
                                        torch.stack([p1, p2[d1], bonus]), gen)
        if accepted == 0:  # x1 = nxt; a second round drafts x2 with K = 1
            x1 = nxt
            d = int(torch.multinomial(q2[x1], 1, generator=gen))
            a2, nxt2 = verify_sampling(torch.tensor([d]), q2[x1][None], torch.stack([p2[x1], bonus]), gen)
            x2 = d if a2 == 1 else nxt2
        elif accepted == 1:
            x1, x2 = d1, nxt
        else:
            x1, x2 = d1, d2
        counts[x1, x2] += 1
    expected = p1[:, None] * p2
    assert (counts / n - expected).abs().max() < 0.012
    assert counts[4].sum() == 0 and counts[0, 0] > 0
    # The draft alone is far from the target, so the test can tell a broken rule apart.
    assert (q1[:, None] * q2 - expected).abs().max() > 0.1


def test_acceptance_stats_tau_and_per_depth_rates():
    stats = AcceptanceStats(3)
    stats.add([0, 3, 1, 3])
    assert stats.histogram == [1, 1, 0, 2]
    assert stats.tau == pytest.approx((1 + 4 + 2 + 4) / 4)
    assert stats.per_position_acceptance() == pytest.approx([0.75, 0.5, 0.5])
    with pytest.raises(ValueError):
        stats.add([4])


# ------------------------------------------------------------------ the loop on real targets
class OracleDrafter:
    """Proposes the reference continuation (optionally wrong from a depth on) and records
    what the loop feeds it, to check the round bookkeeping without a neural draft."""

    def __init__(self, prompt_len: int, reference: list[int], wrong_at: int | None = None) -> None:
        self.prompt_len, self.reference, self.wrong_at = prompt_len, reference, wrong_at
        self.extends: list[tuple[int, int]] = []

    def reset(self) -> None:
        self.length = 0
        self.extends = []

    def extend(self, aux_hidden, next_ids):
        assert aux_hidden.shape[:2] == next_ids.shape
        self.extends.append((aux_hidden.shape[1], aux_hidden.shape[2]))
        self.length += next_ids.shape[1]
        return aux_hidden

    def propose(self, k, temperature=0.0, generator=None):
        done = self.length - self.prompt_len + 1  # tokens already generated and verified
        tokens = (self.reference[done:done + k] + [0] * k)[:k]
        if self.wrong_at is not None:
            tokens[self.wrong_at] = (tokens[self.wrong_at] + 1) % 2048
        return DraftProposal(token_ids=torch.tensor(tokens), probs=None)


@pytest.fixture(scope="module")
def tiny_model(tiny_target_dir):
    from stage_extract.target import load_target

    return load_target(str(tiny_target_dir), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from stage_extract.target import load_target

    return load_target(str(smollm2_dir), device=torch.device("cpu"), dtype=torch.float32)


def _prompt(tokenizer, text: str) -> torch.Tensor:
    from stage_extract.regenerate import render_generation_prompt

    return torch.tensor([render_generation_prompt(tokenizer, [{"role": "user", "content": text}])])


@pytest.mark.parametrize("wrong_at, accepted", [(None, 3), (1, 1), (0, 0)])
def test_round_bookkeeping_with_an_oracle_draft(tiny_model, wrong_at, accepted):
    tokenizer, model = tiny_model
    ids = _prompt(tokenizer, "Count from one to ten in words.")
    reference = target_generate(model, ids, max_new_tokens=13, eos_ids=frozenset()).tokens
    drafter = OracleDrafter(ids.shape[1], reference, wrong_at)
    out = speculative_generate(model, drafter, ids, layer_ids=(1, 3, 4), draft_tokens=3, max_new_tokens=13,
                               eos_ids=frozenset())
    assert out.tokens == reference
    rounds = {3: 3, 1: 6, 0: 12}[accepted]  # 1 prefill token, then accepted + 1 per round
    assert out.accepted == [accepted] * rounds
    assert out.target_forwards == rounds + 1
    # The draft sees the prompt once, then accepted + 1 verified positions per round (not the last).
    assert drafter.extends == [(ids.shape[1], 3 * 64)] + [(accepted + 1, 3 * 64)] * (rounds - 1)


def test_speculative_sampling_runs_on_a_real_target(tiny_model):
    tokenizer, model = tiny_model
    draft = Eagle3DraftModel(DraftConfig.from_target_config(model.config, 4096))
    draft.set_vocab_mapping(torch.arange(4096))
    draft.load_target_embeddings(model.get_input_embeddings().weight)
    ids = _prompt(tokenizer, "Write a haiku about the sea.")
    out = speculative_generate(model, Eagle3DraftRunner(draft), ids, layer_ids=(1, 3, 4), draft_tokens=3,
                               max_new_tokens=20, eos_ids=frozenset(), temperature=0.8,
                               generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 20
    assert all(0 <= a <= 3 for a in out.accepted)
    assert 1 + sum(a + 1 for a in out.accepted) >= 20  # every round gained its tokens


def test_greedy_speculative_equals_target_greedy_on_smollm2_with_a_random_draft(smollm2):
    tokenizer, model = smollm2
    torch.manual_seed(0)
    draft = Eagle3DraftModel(DraftConfig.from_target_config(model.config, 2048))
    draft.load_target_embeddings(model.get_input_embeddings().weight)
    runner = Eagle3DraftRunner(draft)
    eos = eos_token_ids(model, tokenizer)
    assert eos == {2}
    for number, text in enumerate(("What is the capital of France?", "Write a short poem about the sea.")):
        ids = _prompt(tokenizer, text)
        base = target_generate(model, ids, max_new_tokens=16, eos_ids=eos)
        if number == 0:  # the baseline loop is the target's own greedy decoding
            assert base.tokens == model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        spec = speculative_generate(model, runner, ids, layer_ids=(1, 14, 26), draft_tokens=3,
                                    max_new_tokens=16, eos_ids=eos)
        assert spec.tokens == base.tokens
        assert spec.target_forwards == 1 + len(spec.accepted)


# ------------------------------------------------------------------ `talon eval` end to end
@pytest.fixture(scope="module")
def trained_smollm2_run(smollm2_dir, tmp_path_factory):
    """A draft trained briefly on 10 real ShareGPT samples extracted from the real SmolLM2."""
    from pipeline.config import TrainConfig
    from stage_extract.run import run_extract
    from stage_train.trainer import run_train
    from tests.conftest import extract_config

    root = tmp_path_factory.mktemp("eval-run")
    run_extract(extract_config(root / "cache", smollm2_dir, "sharegpt", max_samples=10, max_length=128,
                               batch_tokens=512, part_tokens=4096))
    run_train(TrainConfig(cache=root / "cache", out=root / "run", ttt_steps=3, draft_vocab=2048, max_steps=12,
                          lr=2e-3, warmup_ratio=0.0, batch_tokens=512, device="cpu", log_every=4, progress=False))
    return root / "run"


def test_eval_command_reports_real_speculative_decoding(trained_smollm2_run, smollm2_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from pipeline.cmd_eval import eval_command

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"turns": ["Name three primary colours.", "And secondary ones?"], "id": "colours"}) + "\n"
        + json.dumps({"prompt": "What is the capital of France?"}) + "\n"
    )
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("unused")(lambda: None)  # keep typer in multi-command mode, as in the real CLI
    result = CliRunner().invoke(app, [
        "eval", "--draft", str(trained_smollm2_run / "export"), "--target", str(smollm2_dir),
        "--prompts", str(prompts), "--max-new-tokens", "16", "--device", "cpu", "--json", "--no-progress",
        "--no-warmup",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["greedy_equal"] is True and report["mismatches"] == []
    assert report["turns"] == 3 and report["prompt_count"] == 2
    assert report["draft_tokens"] == 3  # the run's TTT depth
    summary = json.loads((trained_smollm2_run / "summary.json").read_text())
    assert report["simulated_tau"] == summary["final"]["simulated_acceptance_length"]
    assert report["simulated_tau_depth"] == 3
    assert report["aux_layer_ids"] == [1, 14, 26]
    assert report["rounds"] == sum(report["accept_histogram"]) > 0
    assert 1.0 <= report["tau"] <= 4.0
    rates = report["per_position_acceptance"]
    assert len(rates) == 3 and all(a >= b for a, b in zip(rates, rates[1:]))
    assert report["tau"] == pytest.approx(1 + sum(rates), abs=1e-3)
    assert report["tokens_per_s"] > 0 and report["baseline_tokens_per_s"] > 0
    assert report["speedup"] == pytest.approx(report["tokens_per_s"] / report["baseline_tokens_per_s"], rel=1e-2)
    assert report["generated_tokens"] == report["baseline_generated_tokens"]
    assert report["target_forwards"] == report["turns"] + report["rounds"]
    plot = trained_smollm2_run / "eval_acceptance.png"
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((trained_smollm2_run / "eval.json").read_text())["tau"] == report["tau"]


def test_eval_config_rejects_bad_values(tmp_path):
    from stage_train.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="not an exported draft"):
        EvalConfig(draft=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--draft-tokens"):
        EvalConfig(draft=tmp_path, draft_tokens=0)
    with pytest.raises(ConfigError, match="--temperature"):
        EvalConfig(draft=tmp_path, temperature=-0.5)
    with pytest.raises(ConfigError, match="--device"):
        EvalConfig(draft=tmp_path, device="tpu")
    assert EvalConfig(draft=tmp_path).plot_path == tmp_path.resolve().parent / "eval_acceptance.png"


def test_sharded_eval_merges_to_the_unsharded_report(trained_smollm2_run, smollm2_dir, tmp_path):
    """`--shard-index I --num-shards N` splits the prompts; `talon eval-merge` adds the shards
    up to exactly the unsharded counts, and refuses duplicate, missing or foreign shards."""
    from stage_train.evaluate import EvalConfig, merge_eval_reports, run_eval

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("Name three primary colours.", "What is the capital of France?", "Count to five.")))

    def evaluate(name: str, **kwargs) -> Path:
        report = tmp_path / f"{name}.json"
        run_eval(EvalConfig(draft=trained_smollm2_run / "export", target=str(smollm2_dir), prompts=str(prompts),
                            max_new_tokens=12, device="cpu", warmup=False, progress=False, report=report,
                            plot=tmp_path / f"{name}.png", **kwargs))
        return report

    whole = json.loads(evaluate("whole").read_text())
    shards = [evaluate(f"shard{i}", shard_index=i, num_shards=4) for i in range(4)]
    assert [json.loads(p.read_text())["prompt_count"] for p in shards] == [1, 1, 1, 0]  # more shards than prompts
    assert json.loads(shards[3].read_text())["rounds"] == 0
    merged = merge_eval_reports(shards[::-1], tmp_path / "merged.json")
    for key in ("accept_histogram", "rounds", "tau", "per_position_acceptance", "turns", "prompt_count",
                "generated_tokens", "baseline_generated_tokens", "target_forwards", "greedy_equal", "mismatches"):
        assert merged[key] == whole[key], key
    assert merged["shard"] == {"index": 0, "count": 1, "merged_from": 4}
    assert (tmp_path / "merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match="shard 0 given twice"):
        merge_eval_reports([shards[0], shards[0]], tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"shard\(s\) \[1, 2, 3\] of 4 missing"):
        merge_eval_reports([shards[0]], tmp_path / "x.json")

    def altered(name: str, **changes) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(json.loads(shards[1].read_text()) | changes))
        return path

    with pytest.raises(ValueError, match="foreign.json: draft_tokens=5 differs"):
        merge_eval_reports([shards[0], altered("foreign", draft_tokens=5)], tmp_path / "x.json")
    with pytest.raises(ValueError, match="limited.json: limit=2 differs"):  # a shard run with another --limit
        merge_eval_reports([shards[0], altered("limited", limit=2)], tmp_path / "x.json")
    with pytest.raises(ValueError, match="outside 0..3"):
        merge_eval_reports([shards[0], altered("bogus", shard={"index": 5, "count": 4})], tmp_path / "x.json")
    with pytest.raises(ConfigError, match="--shard-index"):
        EvalConfig(draft=trained_smollm2_run / "export", shard_index=2, num_shards=2)
