"""Generation: greedy and sampled decoding, batches of prompts with different lengths, EOS, bad
inputs, and the `v4hal generate` command (preset demo and a saved checkpoint)."""

import pytest
import torch

from v4hal.cli import main as cli
from v4hal.model.config import preset
from v4hal.model.generate import Sampling, generate, sample
from v4hal.model.model import build


@pytest.fixture(scope="module")
def tiny():
    return build(preset("tiny")).init_random(seed=5)


def _prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_is_argmax_of_the_uncached_forward(tiny):
    p = _prompt(17, 0)
    res = generate(tiny, [p], 6, keep_logits=True)
    seq = list(p)
    with torch.no_grad():
        for tok, step_logits in zip(res.tokens[0], res.logits[0]):
            full = tiny(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-4)
            assert tok == int(full.argmax())
            seq.append(tok)


def test_batch_of_different_lengths_equals_one_prompt_at_a_time(tiny):
    prompts = [_prompt(n, n) for n in (21, 9, 21, 14)]
    together = generate(tiny, prompts, 7, keep_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(tiny, [p], 7, keep_logits=True)
        assert together.tokens[i] == alone.tokens[0]
        torch.testing.assert_close(together.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
    assert together.prefill_tokens == sum(map(len, prompts))
    assert together.decode_steps == 3 * 6  # three length groups, six batched decode forwards each


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    p = [_prompt(10, 1)]
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    assert generate(tiny, p, 8, s).tokens == generate(tiny, p, 8, s).tokens
    assert generate(tiny, p, 8, Sampling(temperature=0.7, top_k=1, seed=3)).tokens == generate(tiny, p, 8).tokens


def test_sample_top_p_and_top_k_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 crosses it: the crossing token stays
    picks = {int(sample(logits, Sampling(temperature=1.0, top_k=3), g)) for _ in range(300)}
    assert picks == {0, 1, 2}
    assert int(sample(logits, Sampling(temperature=0.0))) == 0


def test_eos_stops_a_sequence(tiny):
    p = _prompt(12, 2)
    free = generate(tiny, [p], 6).tokens[0]
    stopped = generate(tiny, [p], 6, eos_token_id=free[2]).tokens[0]
    assert stopped == free[: free.index(free[2]) + 1]


@pytest.mark.parametrize("prompts,n,msg", [([[]], 3, "at least one token"), ([[1, 2]], 0, "max_new_tokens"),
                                           ([[1, 99999]], 3, "token ids must be in")])
def test_bad_requests(tiny, prompts, n, msg):
    with pytest.raises(ValueError, match=msg):
        generate(tiny, prompts, n)


def test_cli_tiny_demo(capsys):
    assert cli(["generate", "--preset", "tiny", "--max-new-tokens", "4", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v4" in out and "compressed_sparse_attention" in out and "tokens/s" in out
    assert out.count("generated: [") == 2


def test_cli_checkpoint(tmp_path, capsys):
    from test_model_logits import make_pair

    make_pair("v4-mixed", tmp_path)
    assert cli(["generate", "--config", str(tmp_path / "config.json"), "--weights", str(tmp_path),
                "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "3", "--temperature", "0.5", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "tensors from 1 file(s)" in out and "sampled (T=0.5" in out and out.count("generated: [") == 2
    assert cli(["generate", "--config", str(tmp_path / "config.json")]) == 2
