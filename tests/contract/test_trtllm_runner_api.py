"""vlmforge's calls into TensorRT-LLM's multimodal runner, against the releases' own signatures and streaming
protocol (trtllm_runner_api.json). TensorRT-LLM cannot be installed here: the runner is stood in for by classes
whose signatures are the recorded source lines, and a ModelRunnerCpp stand-in that streams the way _stream does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlmforge.runner.trtllm import StreamingModel, run_multimodal

pytestmark = pytest.mark.container  # runs inside NVIDIA's TensorRT-LLM 1.2 image: CI runs it again there

API = json.loads((Path(__file__).parent / "trtllm_runner_api.json").read_text())
END_ID, MAX_SEQ_LEN = 2, 24


def runner_class(signature: str) -> type:
    """A stand-in MultimodalModelRunner whose ``run`` has exactly the release's signature; it records the binding."""
    namespace: dict[str, Any] = {}
    body = "    return 'text', [[{k: v for k, v in locals().items() if k != 'self'}]]"
    exec(f"{signature}\n{body}", namespace)  # noqa: S102 - a recorded source line
    return type("MultimodalModelRunner", (), {"run": namespace["run"]})


@pytest.mark.parametrize("release", ["1.2", "0.10"])
def test_run_is_called_with_the_release_signature(release: str) -> None:
    runner = runner_class(API["MultimodalModelRunner.run"][release])()
    output = run_multimodal(runner, "Which city?", ["image"], 17)
    bound = output[0][0]
    assert bound["max_new_tokens"] == 17 and bound["input_text"] == "Which city?" and bound["input_image"] == ["image"]
    assert bound.get("input_audio") is None


class CppRunner:
    """ModelRunnerCpp's protocol: whole outputs, or (streaming) one yield per batch of new responses."""

    def __init__(self, generated: list[list[list[int]]]) -> None:
        self.generated = generated  # per row: the chunks of tokens each response brings
        self.calls: list[dict[str, Any]] = []

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[row + [END_ID] * (MAX_SEQ_LEN - len(row))] for row in rows], dtype=torch.int32)

    def generate(self, batch_input_ids: list[torch.Tensor], *, streaming: bool = False, return_dict: bool = False,
                 output_sequence_lengths: bool = False, **kwargs: Any) -> Any:
        self.calls.append({"streaming": streaming, "return_dict": return_dict, **kwargs})
        rows = [ids.tolist() for ids in batch_input_ids]

        def outputs() -> Any:
            ids = self._pad(rows)
            if not return_dict:
                return ids
            out = {"output_ids": ids}
            if output_sequence_lengths:
                out["sequence_lengths"] = torch.tensor([[len(r)] for r in rows], dtype=torch.int32)
            return out

        if not streaming:
            for row, chunks in zip(rows, self.generated, strict=True):
                row.extend(t for chunk in chunks for t in chunk)
            return outputs()

        def stream() -> Any:
            for step in range(max(len(c) for c in self.generated)):
                for row, chunks in zip(rows, self.generated, strict=True):
                    if step < len(chunks):
                        row.extend(chunks[step])
                yield outputs()
        return stream()


def test_streaming_hands_over_every_token_once_and_returns_what_the_whole_call_would() -> None:
    generated = [[[11], [12, 13], [14]], [[21, 22], [], [23]]]  # row 1's second response brings nothing
    inputs = [torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([5, 6, 7, 8, 9], dtype=torch.int32)]
    whole = CppRunner(generated).generate(inputs, max_new_tokens=8, end_id=END_ID, return_dict=False,
                                          output_sequence_lengths=False)
    seen: list[tuple[int, int]] = []
    cpp = CppRunner(generated)
    proxy = StreamingModel(cpp, lambda row, token: seen.append((row, token)))
    streamed = proxy.generate(inputs, max_new_tokens=8, end_id=END_ID, return_dict=False,
                              output_sequence_lengths=False)
    assert torch.equal(streamed, whole)
    assert [t for r, t in seen if r == 0] == [11, 12, 13, 14] and [t for r, t in seen if r == 1] == [21, 22, 23]
    assert seen.index((0, 12)) < seen.index((1, 23))  # in the order they arrived, not row by row
    assert proxy.tokens == {0: [11, 12, 13, 14], 1: [21, 22, 23]}
    assert cpp.calls[0]["streaming"] is True and cpp.calls[0]["return_dict"] is True
    assert cpp.calls[0]["max_new_tokens"] == 8 and cpp.calls[0]["end_id"] == END_ID
    cpp.max_seq_len = MAX_SEQ_LEN
    assert proxy.max_seq_len == MAX_SEQ_LEN  # everything else is the real runner's


def test_a_stream_that_yields_nothing_is_an_error() -> None:
    proxy = StreamingModel(CppRunner([[]]), lambda row, token: None)
    with pytest.raises(RuntimeError, match="streamed nothing"):
        proxy.generate([torch.tensor([1], dtype=torch.int32)])


# --- sampling ------------------------------------------------------------------------------------------------


def recorded_generate_kwargs() -> dict[str, Any]:
    """The keyword arguments the multimodal runner passes its LLM runner, from the recorded 1.2 call line."""
    import ast

    line = API["MultimodalModelRunner.generate calls its LLM runner (decoder-only LLMs), 1.2"][0]
    call = ast.parse(line.split("=", 1)[1].strip()).body[0].value  # type: ignore[attr-defined]
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def test_sampling_reaches_the_llm_runner_under_names_it_accepts() -> None:
    from vlmforge.runner.sampling import SamplingParams
    from vlmforge.runner.trtllm import trtllm_sampling

    accepted = set(API["ModelRunnerCpp.generate sampling keyword arguments, 1.2"]["accepted_parameters"])
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=11, presence_penalty=0.5,
                            frequency_penalty=0.25, repetition_penalty=1.1, min_tokens=3)
    sent = trtllm_sampling(params)
    assert set(sent) <= accepted, set(sent) - accepted  # anything else would be dropped silently
    assert sent == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "random_seed": 11, "presence_penalty": 0.5,
                    "frequency_penalty": 0.25, "repetition_penalty": 1.1, "min_tokens": 3}
    recorded = recorded_generate_kwargs()
    assert {"top_k", "top_p", "temperature", "repetition_penalty"} <= set(recorded), "what the proxy replaces"
    cpp = CppRunner([[[11], [12]]])
    proxy = StreamingModel(cpp, None, sent)
    proxy.generate([torch.tensor([5, 6], dtype=torch.int32)], **recorded)
    call = cpp.calls[0]
    assert all(call[name] == value for name, value in sent.items())
    assert call["max_new_tokens"] == recorded["max_new_tokens"] and call["end_id"] == recorded["end_id"]
    assert proxy.tokens == {0: [11, 12]}, "without on_token the tokens are collected"
    unlimited = trtllm_sampling(SamplingParams(temperature=1.0, seed=1))
    assert unlimited["top_k"] == 0 and unlimited["top_p"] == 1.0, "no top-k, all tokens (top_p 0 would be greedy)"


def test_greedy_requests_pass_nothing_and_what_cannot_be_honoured_is_refused() -> None:
    from vlmforge.runner.sampling import SamplingParams, UnsupportedSampling
    from vlmforge.runner.trtllm import check_trtllm_sampling, trtllm_sampling

    assert trtllm_sampling(None) == {} and trtllm_sampling(SamplingParams()) == {}
    assert trtllm_sampling(SamplingParams(top_p=0.5, top_k=3)) == {}, "greedy ignores top-k/top-p, as run.py's"
    check_trtllm_sampling(SamplingParams(temperature=1.0, seed=1), encoder_decoder=False)
    for params, encoder_decoder, param in [(SamplingParams(logprobs=2), False, "logprobs"),
                                           (SamplingParams(ignore_eos=True), False, "ignore_eos"),
                                           (SamplingParams(temperature=0.5, seed=1), True, "temperature"),
                                           (SamplingParams(min_tokens=2), True, "min_tokens")]:
        with pytest.raises(UnsupportedSampling) as caught:
            check_trtllm_sampling(params, encoder_decoder=encoder_decoder)
        assert caught.value.param == param and str(caught.value).startswith(f"{param}: ")
