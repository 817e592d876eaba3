"""RULER-style retrieval tasks, generated offline from the project's texts.

Each trial hides one or more facts ("needles") in filler text (Botchan, or any text), asks
about them in the chat template of an instruct model, and is scored like RULER's string
match: the fraction of the expected strings found in the model's answer.

Tasks (the facts are sentences between the filler's sentences):
- passkey:     one 5-digit pass key, asked.
- multikey:    several "special magic number for <word>" sentences with distinct words,
               one of them asked (the others are distractors).
- multivalue:  one word with several magic numbers, all of them asked.
- vartrack:    variable tracking: "VAR X = 12345." then chains "VAR Y = VAR X." ...;
               asked: every variable that holds 12345 (needs every hop of the chain).

Lengths: a trial's prompt, chat template included, plus `reserve` tokens for the answer fit
in the target context. Depth: where the asked fact sits, as a fraction of the filler's
tokens before it (the first fact of the asked chain for vartrack, the first value for
multivalue); the other facts go to random depths (after it, in order, for a chain).
Everything is deterministic from the suite's seed.

    python -m research.tasks --specs hf,full --contexts 2048 --trials 10
runs the suite on SmolLM2-135M-Instruct (see main() for the options).
"""
import argparse
import bisect
import json
import random
import re
import string
import sys
import time
from dataclasses import dataclass, field

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CONTEXTS = (1024, 2048, 4096)

# Keys of the magic-number tasks: short, common, one word each, none a substring of another.
KEY_WORDS = (
    "apple", "river", "candle", "mountain", "violin", "garden", "pepper", "window", "tiger",
    "rocket", "lemon", "island", "hammer", "forest", "pillow", "dragon", "marble", "ocean",
    "bicycle", "castle", "feather", "lantern", "meadow", "parrot", "quartz", "saddle",
    "thunder", "umbrella", "velvet", "walnut", "anchor", "blanket", "cactus", "dolphin",
    "engine", "falcon", "glacier", "harbor", "jacket", "kettle",
)


@dataclass(frozen=True)
class Facts:
    """What one trial hides and asks: an instruction before the text, the needle sentences
    with their depths (fractions of the filler), the question after the text, the answers."""

    intro: str
    needles: tuple            # ((sentence, depth), ...)
    question: str
    answers: tuple            # expected strings, all to be found in the output


def _numbers(rng, count):
    """`count` distinct 5-digit numbers as strings."""
    return [str(n) for n in rng.sample(range(10000, 100000), count)]


@dataclass(frozen=True)
class PassKey:
    """One pass key sentence at the requested depth."""

    @property
    def name(self):
        return "passkey"

    def facts(self, rng, depth):
        """Facts of one trial drawn from rng (random.Random), the key at `depth`."""
        (value,) = _numbers(rng, 1)
        return Facts(
            intro="There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the pass key.",
            needles=((f"The pass key is {value}. Remember it. {value} is the pass key.", depth),),
            question="What is the pass key?",
            answers=(value,))


MAGIC_INTRO = ("Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")


def _magic(word, value):
    return f"The special magic number for {word} is: {value}."


@dataclass(frozen=True)
class MultiKey:
    """`keys` magic-number sentences with distinct words; the first, at the requested depth,
    is asked; the others are distractors at random depths."""

    keys: int = 4

    @property
    def name(self):
        return f"multikey-{self.keys}"

    def facts(self, rng, depth):
        """Facts of one trial drawn from rng, the asked key at `depth`."""
        words = rng.sample(KEY_WORDS, self.keys)
        values = _numbers(rng, self.keys)
        depths = [depth] + [rng.random() for _ in words[1:]]
        return Facts(
            intro=MAGIC_INTRO,
            needles=tuple((_magic(w, v), d) for w, v, d in zip(words, values, depths)),
            question=f"What is the special magic number for {words[0]} mentioned in the text above?",
            answers=(values[0],))


@dataclass(frozen=True)
class MultiValue:
    """One word with `values` magic numbers, the first at the requested depth, the others at
    random depths; all values are asked."""

    values: int = 4

    @property
    def name(self):
        return f"multivalue-{self.values}"

    def facts(self, rng, depth):
        """Facts of one trial drawn from rng, the first value at `depth`."""
        word = rng.choice(KEY_WORDS)
        values = _numbers(rng, self.values)
        depths = [depth] + [rng.random() for _ in values[1:]]
        return Facts(
            intro=MAGIC_INTRO,
            needles=tuple((_magic(word, v), d) for v, d in zip(values, depths)),
            question=f"What are all the special magic numbers for {word} mentioned in the text above?",
            answers=tuple(values))


@dataclass(frozen=True)
class VariableTracking:
    """`chains` chains of `hops` + 1 variables (five capital letters each): "VAR A = value."
    then "VAR B = VAR A." ... in text order. The first chain starts at the requested depth,
    its hops at random later depths; the other chains (distractors, other values) anywhere.
    ask "names": every variable of the first chain is asked (RULER's form); ask "value": the
    value of the chain's last variable is asked (one answer, found through every hop; with
    several chains, guessing one of the numbers is right 1/chains of the time)."""

    hops: int = 2
    chains: int = 1
    ask: str = "names"

    def __post_init__(self):
        if self.ask not in ("names", "value"):
            raise ValueError(f"ask: expected 'names' or 'value', got {self.ask!r}")

    @property
    def name(self):
        return f"vartrack-{self.chains}x{self.hops}" + ("-value" if self.ask == "value" else "")

    def facts(self, rng, depth):
        """Facts of one trial drawn from rng, the asked chain's first assignment at `depth`."""
        values = _numbers(rng, self.chains)
        names = set()
        while len(names) < self.chains * (self.hops + 1):
            names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        names = sorted(names)
        rng.shuffle(names)
        chains = [names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)] for c in range(self.chains)]
        needles = []
        for c, (chain, value) in enumerate(zip(chains, values)):
            start = depth if c == 0 else rng.random()
            depths = [start] + sorted(rng.uniform(start, 1.0) for _ in chain[1:])
            lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            needles += zip(lines, depths)
        intro = "Memorize and track the chain(s) of variable assignments hidden in the following text."
        if self.ask == "value":
            return Facts(intro, tuple(needles), f"What number is assigned to VAR {chains[0][-1]} in the text above?",
                         (values[0],))
        return Facts(intro, tuple(needles), f"Find all variables that are assigned the value {values[0]} in the "
                     "text above. List every one of them.", tuple(chains[0]))


def default_tasks():
    """The suite's tasks, sized for SmolLM2-135M-Instruct's full-cache ceiling
    (research/results/retrieval_probe.md): pass key, 2 keys (one asked, one distractor),
    2 values, one chain of 1 hop. With 4 keys the model often answers a distractor's number,
    with 4 values it repeats some and misses others, with 2 hops it rarely lists the chain."""
    return (PassKey(), MultiKey(2), MultiValue(2), VariableTracking(hops=1, chains=1))


def split_sentences(text):
    """The text's sentences, whitespace collapsed: a sentence ends at . ! or ? (and a closing
    quote) followed by a space."""
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+", flat) if s]


class Filler:
    """A filler text as sentences with their token counts (each tokenized with a leading
    space, as it appears inside the context), so a trial can be sized without re-tokenizing
    the whole text."""

    def __init__(self, text, tokenizer):
        self.sentences = split_sentences(text)
        ids = tokenizer([" " + s for s in self.sentences], add_special_tokens=False)["input_ids"]
        self.lengths = [len(x) for x in ids]

    def take(self, start, tokens):
        """Consecutive sentences from index `start` (wrapping around the text) whose token
        counts sum to at most `tokens`. Returns (sentences, lengths), two lists."""
        out, lengths, total, n = [], [], 0, len(self.sentences)
        for i in range(n):
            j = (start + i) % n
            if total + self.lengths[j] > tokens:
                break
            out.append(self.sentences[j])
            lengths.append(self.lengths[j])
            total += self.lengths[j]
        return out, lengths


@dataclass
class Trial:
    """One retrieval trial: prompt token ids (chat-templated, ready to prefill), the expected
    answer strings, and metadata (task, context, depth, seed, index, prompt length, and the
    sentence indices of the filler before which each needle went)."""

    prompt_ids: list
    answers: tuple
    meta: dict = field(default_factory=dict)

    @property
    def task(self):
        return self.meta["task"]

    @property
    def context(self):
        return self.meta["context"]


def insertion_points(lengths, depths):
    """Sentence index before which a needle at each depth goes: the first sentence boundary
    with at least depth * (total tokens) filler tokens before it."""
    prefix = [0]
    for n in lengths:
        prefix.append(prefix[-1] + n)
    return [bisect.bisect_left(prefix, d * prefix[-1]) for d in depths]


def render(facts, sentences, lengths):
    """The user message: intro, filler with the needles inserted at their depths (stable in
    the facts' order where several fall at one point), question. Returns (message, points)."""
    points = insertion_points(lengths, [d for _, d in facts.needles])
    at = {}
    for (sentence, _), p in zip(facts.needles, points):
        at.setdefault(p, []).append(sentence)
    pieces = []
    for i in range(len(sentences) + 1):
        pieces += at.get(i, [])
        if i < len(sentences):
            pieces.append(sentences[i])
    return f"{facts.intro}\n\n{' '.join(pieces)}\n\n{facts.question}", points


def encode_chat(tokenizer, message):
    """Token ids of one user message in the tokenizer's chat template, with the assistant's
    generation prompt (the template's system prompt, if any, included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_trial(tokenizer, filler, task, context, depth, seed, index, reserve=32):
    """One trial of `task` whose prompt plus `reserve` answer tokens fits in `context` tokens.
    Filler sentences start at a random sentence; facts whose answers occur in that filler
    are drawn again. Deterministic in (seed, task name, context, index)."""
    rng = random.Random(f"{seed}/{task.name}/{context}/{index}")
    budget = context - reserve
    start = rng.randrange(len(filler.sentences))
    for _ in range(100):
        facts = task.facts(rng, depth)
        bare, _ = render(facts, [], [])
        room = budget - len(encode_chat(tokenizer, bare))
        sentences, lengths = filler.take(start, room)
        if room <= 0 or not sentences:
            raise ValueError(f"context {context}: no room for filler after the template and {reserve} reserved tokens")
        if not any(a in s for a in facts.answers for s in sentences):
            break
    else:
        raise ValueError("the filler contains the answers of every draw")
    # Per-sentence counts are close to, not equal to, the joined text's: trim until it fits.
    while True:
        message, points = render(facts, sentences, lengths)
        ids = encode_chat(tokenizer, message)
        if len(ids) <= budget:
            break
        sentences, lengths = sentences[:-1], lengths[:-1]
    meta = dict(task=task.name, context=context, depth=depth, seed=seed, index=index, length=len(ids),
                points=points, sentences=len(sentences))
    return Trial(ids, facts.answers, meta)


def suite(tokenizer, filler, contexts=CONTEXTS, trials_per_cell=5, seed=0, tasks=None, depths=DEPTHS, reserve=32):
    """Trials of every task at every context length.

    tokenizer:       a HF tokenizer with a chat template (or anything with the same calls).
    filler:          the filler text (str) or a Filler built from it.
    contexts:        target lengths in tokens (prompt, chat template included, + reserve).
    trials_per_cell: trials per (task, context); trial i puts the asked fact at
                     depths[i % len(depths)].
    tasks:           task objects (default_tasks() when None).
    reserve:         tokens kept free for the answer (use the generation's max_new_tokens).
    Returns a list of Trial, task-major then context then index.
    """
    filler = filler if isinstance(filler, Filler) else Filler(filler, tokenizer)
    tasks = default_tasks() if tasks is None else tasks
    return [make_trial(tokenizer, filler, task, context, depths[i % len(depths)], seed, i, reserve)
            for task in tasks for context in contexts for i in range(trials_per_cell)]


def string_match(output, answers):
    """RULER-style string match: (fraction of the answers found in output, all found), both
    case-insensitive substring tests."""
    found = [a.lower() in output.lower() for a in answers]
    return sum(found) / len(found), all(found)


def truncate(tokens, stop_ids):
    """tokens up to (without) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return list(tokens[:i])
    return list(tokens)


@dataclass
class Outcome:
    """One trial's result: the generated tokens (cut at the first stop token), their text,
    the string-match score and all-found flag, and the generation's wall time."""

    trial: Trial
    tokens: list
    text: str
    score: float
    all_found: bool
    seconds: float


@dataclass
class Results:
    """Outcomes of one generator over a list of trials."""

    outcomes: list

    def table(self, by=("task", "context")):
        """Rows (dicts) grouped by the metadata keys `by`: the keys, n, mean score (fraction
        of answers found) and accuracy (fraction of trials with every answer found)."""
        groups = {}
        for o in self.outcomes:
            groups.setdefault(tuple(o.trial.meta[k] for k in by), []).append(o)
        return [dict(zip(by, key), n=len(g), score=sum(o.score for o in g) / len(g),
                     accuracy=sum(o.all_found for o in g) / len(g)) for key, g in groups.items()]

    def markdown(self, by=("task", "context")):
        """The table as markdown lines."""
        rows = self.table(by)
        head = [*by, "n", "score", "all found"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([*(str(r[k]) for k in by), str(r["n"]), f"{r['score']:.2f}",
                                            f"{round(r['accuracy'] * r['n'])}/{r['n']}"]) + " |")
        return "\n".join(lines)


def run(trials, generate, tokenizer, stop_ids=(), progress=None):
    """Runs `generate(prompt_ids: list[int]) -> list[int]` (new tokens only) on every trial,
    cuts each answer at the first of stop_ids, decodes it (special tokens skipped) and scores
    it. progress(i, n, outcome) is called after each trial. Returns Results."""
    stop_ids = set(stop_ids)
    outcomes = []
    for i, trial in enumerate(trials):
        t0 = time.perf_counter()
        tokens = truncate(list(generate(trial.prompt_ids)), stop_ids)
        seconds = time.perf_counter() - t0
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        outcomes.append(Outcome(trial, tokens, text, *string_match(text, trial.answers), seconds))
        if progress is not None:
            progress(i + 1, len(trials), outcomes[-1])
    return Results(outcomes)


def transformers_generator(model, max_new_tokens):
    """Greedy generation through the HF model's own `generate` (full cache): a callable for
    run()."""
    import torch

    def generate(prompt_ids):
        ids = torch.tensor([prompt_ids], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens)
        return out[0, len(prompt_ids):].tolist()

    return generate


def engine_generator(runner, policy, settings, max_new_tokens):
    """Greedy generation through the library's engine (LlamaRunner.generate: prefill, plan,
    compress, decode); settings None is the full cache. A callable for run()."""
    import torch

    def generate(prompt_ids):
        tokens, _ = runner.generate([torch.tensor(prompt_ids)], policy, settings, max_new_tokens)
        return tokens[0].tolist()

    return generate


def squeeze_cache_generator(model, policy, settings, max_new_tokens):
    """Greedy generation through transformers' `generate` with a SqueezeCache (the library's
    transformers integration); settings None is the full cache. A callable for run()."""
    import torch

    from squeeze_ops.models.hf import SqueezeCache

    def generate(prompt_ids):
        ids = torch.tensor([prompt_ids], device=model.device)
        cache = SqueezeCache(model, policy, settings, max_new_tokens)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, past_key_values=cache,
                             max_new_tokens=max_new_tokens)
        return out[0, len(prompt_ids):].tolist()

    return generate


def engine_spec(name, fraction):
    """(policy, settings or None) of a command-line spec at a KV budget `fraction` of the prompt
    ("hf", transformers' generate, is handled apart): a name of NAMED_SPECS, or a policy with
    its fields, "kind:field=value:..." (e.g. "h2o:score_queries=1:recent_ratio=0"; values
    are ints, floats or pool modes), optionally followed by "@uniform" (the default),
    "@squeeze" (the authors' formula) or "@recommended" (presets.recommended_allocator of the
    policy's kind at `fraction`)."""
    from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings
    from squeeze_ops.engine.presets import recommended_allocator

    if name == "full":
        return SequencePolicy.window(), None
    spec, _, allocator = name.partition("@")
    if allocator not in ("", "uniform", "squeeze", "recommended"):
        raise ValueError(f"spec {name!r}: allocator: expected uniform, squeeze or recommended, got {allocator!r}")
    kind, *fields = NAMED_SPECS.get(spec, spec).split(":")
    values = {}
    for field in fields:
        key, _, value = field.partition("=")
        try:
            values[key] = int(value)
        except ValueError:
            values[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    try:
        policy = SequencePolicy(kind, **values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {name!r}: {e}") from None
    if allocator == "squeeze":
        return policy, SqueezeSettings.squeeze(b_init=fraction)
    if allocator == "recommended":
        return policy, SqueezeSettings(b_init=fraction, allocator=recommended_allocator(policy.kind, fraction))
    return policy, SqueezeSettings.uniform(b_init=fraction)


# The named specs of the command line (besides "full", the full cache, and "hf").
NAMED_SPECS = {
    "window": "window",
    "streaming": "streaming:sinks=4",
    "h2o": "h2o",
    "h2o-w32": "h2o:score_queries=32",
    "h2o-w1": "h2o:score_queries=1",
    # SnapKV's selection: the last 32 queries' scores max-pooled over 7 neighbours.
    "snapkv": "h2o:score_queries=32:pool_size=7",
}


TASK_NAMES = {t.name: t for t in (PassKey(), MultiKey(2), MultiKey(4), MultiValue(2), MultiValue(4),
                                  VariableTracking(1, 1), VariableTracking(2, 1), VariableTracking(2, 2),
                                  VariableTracking(1, 2, "value"), VariableTracking(2, 2, "value"))}


def main(argv=None):
    """Runs the suite on SmolLM2-135M-Instruct with one or more generators and prints a table
    per generator (and whether "hf" and "full" produced the same tokens)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default="hf,full",
                        help="comma list: hf (transformers generate, full cache), full, window, streaming, h2o, "
                             "h2o-w32, h2o-w1, snapkv (library engine; h2o-wN scores by the last N prompt queries, "
                             "snapkv by the last 32 max-pooled over 7 positions), a policy with its fields "
                             "(kind:field=value:..., e.g. h2o:score_queries=1:recent_ratio=0), any of them with @squeeze or "
                             "@recommended for that layer allocator instead of uniform budgets; hf-<spec>: that "
                             "spec through transformers' generate with a SqueezeCache")
    parser.add_argument("--fraction", type=float, default=0.2, help="uniform KV budget of the compressed specs")
    parser.add_argument("--tasks", default=",".join(t.name for t in default_tasks()),
                        help=f"comma list of {sorted(TASK_NAMES)}")
    parser.add_argument("--contexts", default="1024,2048,4096")
    parser.add_argument("--trials", type=int, default=5, help="trials per (task, context)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="where the Botchan sdist is cached")
    parser.add_argument("--jsonl", default=None, help="append every outcome here")
    args = parser.parse_args(argv)

    import torch
    from research import evaluation

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner, tokenizer, model = evaluation.load_smollm2("cpu")
    text = evaluation.botchan_text(args.data_dir or evaluation.DEFAULT_DATA_DIR)
    tasks = [TASK_NAMES[n] for n in args.tasks.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    trials = suite(tokenizer, text, contexts, args.trials, args.seed, tasks, reserve=args.max_new_tokens)
    print(f"{len(trials)} trials, prompt lengths {min(t.meta['length'] for t in trials)}-"
          f"{max(t.meta['length'] for t in trials)} tokens; setup {time.perf_counter() - t0:.1f}s", flush=True)
    stop = [model.generation_config.eos_token_id]
    tokens = {}
    for name in args.specs.split(","):
        if name == "hf":
            generate = transformers_generator(model, args.max_new_tokens)
        elif name.startswith("hf-"):  # the same spec through model.generate with a SqueezeCache
            generate = squeeze_cache_generator(model, *engine_spec(name[3:], args.fraction), args.max_new_tokens)
        else:
            generate = engine_generator(runner, *engine_spec(name, args.fraction), args.max_new_tokens)
        t1 = time.perf_counter()

        def progress(i, n, o):
            print(f"  [{name}] {i}/{n} {o.trial.task} {o.trial.context} depth {o.trial.meta['depth']}: "
                  f"{o.score:.2f} {o.text!r} ({o.seconds:.1f}s)", file=sys.stderr, flush=True)

        results = run(trials, generate, tokenizer, stop, progress)
        label = name if name in ("hf", "full") else f"{name} at {args.fraction:g}"
        print(f"\n## {label} ({time.perf_counter() - t1:.0f}s)\n\n{results.markdown()}\n", flush=True)
        tokens[name] = [o.tokens for o in results.outcomes]
        if args.jsonl:
            with open(args.jsonl, "a") as out:
                for o in results.outcomes:
                    out.write(json.dumps(dict(spec=name, fraction=args.fraction, meta=o.trial.meta,
                                              answers=o.trial.answers, text=o.text, score=o.score,
                                              all_found=o.all_found, seconds=round(o.seconds, 2))) + "\n")
    if "hf" in tokens and "full" in tokens:
        same = sum(a == b for a, b in zip(tokens["hf"], tokens["full"]))
        print(f"hf vs full (library engine): identical tokens in {same}/{len(trials)} trials")
    print(f"total wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
