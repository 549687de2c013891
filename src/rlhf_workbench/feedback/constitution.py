"""Constitutional self-critique and revision (Bai et al. 2022, "Constitutional AI: Harmlessness
from AI Feedback", arXiv:2212.08073, §3.1 "Method": critique -> revision).

A *constitution* is a file of principles, each a critique request and a revision request
(:func:`load_constitution`; a bundled, clearly illustrative medical one is ``bundled:medical``,
``rlhf_workbench/data/constitution_medical.md``). After a round's feedback is recorded, a critic
model (the policy itself, or the configured LLM judge) is shown one trace and one principle drawn
at random, writes a critique, and then a revision of the trace (:func:`critique_and_revise`). The
pair *revision > original* is kept only with evidence that the revision is better:

- a task with an answer key: the revision verifies under the strict verifier
  (:func:`rlhf_workbench.verify.verify`), and the safety filter does not flag it;
- an open task (no key): the LLM judge prefers the revision in both orders
  (:meth:`rlhf_workbench.feedback.judge.PairwiseJudge.compare`, position swapping), and the safety filter
  does not flag it. Without a judge source in ``feedback.sources`` no open-task revision is kept.

Which traces are revised (decision: a revision needs room to be better than its original): per
task, one trace the round's ranking left unranked (wrong or flagged; an open task's flagged one),
else, for an open task, one of its worst-ranked traces; a keyed task whose traces all verified is
skipped (the verifier could not tell a better revision from a worse one). At most
``max_revisions_per_round`` tasks, drawn in a seeded random order.

Kept revisions are stored as completions of the round with ``origin = "revision"`` (their token ids
are the tokenizer's encoding of the text plus EOS, after the original's prompt ids; their log-probs
are the current policy's at temperature 1, computed here: the text was not sampled from the policy,
so they are not a sampling distribution's), their pairs as :class:`~rlhf_workbench.store.PreferencePair`
rows under the task's ranking of the round. Only DPO trains on them (``loop._round_batch`` reads the
round's pairs); GRPO, RLOO and PPO need on-policy samples and KTO / SFT read the rankings, so for
those algorithms the pairs are stored (and exported) but not trained on: ``constitution/trained`` is
0 then. Every critique and revision, kept or not, with the reason, is recorded in the run's meta
under ``constitution/round_<n>``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhf_workbench.feedback.judge import OpenAIChat, PairwiseJudge, task_question
from rlhf_workbench.feedback.safety import make_safety_filter
from rlhf_workbench.feedback.sources import judge_backend
from rlhf_workbench.model.logprobs import completion_logps
from rlhf_workbench.model.rollout import autocast, generate
from rlhf_workbench.store import CompletionRow, PreferencePair, RankingRow, Rollout, Store, VerificationRow
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.verify import verify

Critic = Callable[[list[list[dict[str, str]]], int], list[str]]
"""A critic: ``critic(conversations, max_tokens) -> replies``, one reply per conversation (a list of
OpenAI-style ``{"role", "content"}`` messages); batched, so the policy critic decodes them together."""


class ConstitutionError(ValueError):
    """A constitution file that cannot be read or parsed; the message names the file (and line)."""


@dataclass(frozen=True)
class Principle:
    """One principle: its ``name`` (the ``##`` heading), the ``critique`` request and the
    ``revision`` request (Bai et al. 2022, Appendix C "Constitutional Principles Used for This Research")."""

    name: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    """The principles of one file (``source``: the path or ``bundled:<name>`` it was read from)."""

    source: str
    principles: tuple[Principle, ...]


def resolve_constitution(path: str | Path) -> Path:
    """A constitution's file: ``bundled:<name>`` is ``rlhf_workbench/data/constitution_<name>.md``.

    Raises:
        ConstitutionError: no such file, or no such bundled constitution (the available names listed).
    """
    path = str(path)
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        data = Path(str(resources.files("rlhf_workbench") / "data"))
        found = data / f"constitution_{name}.md"
        if not found.is_file():
            names = sorted(p.stem[len("constitution_"):] for p in data.glob("constitution_*.md"))
            raise ConstitutionError(f"feedback.constitution.path: no bundled constitution {name!r} "
                                    f"(available: {', '.join(names)})")
        return found
    if not Path(path).is_file():
        raise ConstitutionError(f"feedback.constitution.path: {path}: file not found")
    return Path(path)


_FIELD = re.compile(r"^(critique|revision)\s*:\s*(.*)$", re.IGNORECASE)


def load_constitution(path: str | Path) -> Constitution:
    """Read a constitution: every ``## <name>`` heading starts a principle, under which a line
    ``Critique: ...`` and a line ``Revision: ...`` give its two requests (further non-empty lines
    continue the field above them); text before the first heading is a free preamble.

    Raises:
        ConstitutionError: the file is missing or not UTF-8 text (named), has no principle, or a
            principle lacks a request, repeats one, has text before its first request, or repeats a
            name (``<file>:<line>: ...``).
    """
    file = resolve_constitution(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    principles: list[Principle] = []
    current: dict | None = None

    def close() -> None:
        if current is None:
            return
        for key in ("critique", "revision"):
            if not current.get(key, "").strip():
                raise ConstitutionError(f"{file}:{current['line']}: principle {current['name']!r} has no "
                                        f"'{key.capitalize()}:' line (or it is empty)")
        if any(p.name == current["name"] for p in principles):
            raise ConstitutionError(f"{file}:{current['line']}: principle {current['name']!r} is defined twice")
        principles.append(Principle(current["name"], current["critique"].strip(), current["revision"].strip()))

    for no, line in enumerate(lines, 1):
        if line.startswith("## "):
            close()
            current = {"name": line[3:].strip(), "line": no, "field": None}
            if not current["name"]:
                raise ConstitutionError(f"{file}:{no}: a principle heading without a name")
            continue
        if current is None or not line.strip():
            continue
        m = _FIELD.match(line.strip())
        if m:
            key = m.group(1).lower()
            if key in current:
                raise ConstitutionError(f"{file}:{no}: principle {current['name']!r} has a second '{m.group(1)}:' line")
            current[key], current["field"] = m.group(2), key
        elif current["field"] is None:
            raise ConstitutionError(f"{file}:{no}: text in principle {current['name']!r} before its "
                                    f"'Critique:' or 'Revision:' line: {line.strip()[:60]!r}")
        else:
            current[current["field"]] += " " + line.strip()
    close()
    if not principles:
        raise ConstitutionError(f"{file}: no principles (each starts with a '## <name>' heading followed by "
                                "'Critique:' and 'Revision:' lines)")
    return Constitution(str(path), tuple(principles))


# --------------------------------------------------------------------------------------------
# prompts (Bai et al. 2022 §3.1: "CritiqueRequest" then "RevisionRequest", as chat turns)
# --------------------------------------------------------------------------------------------

CRITIQUE_TEMPLATE = """Here is a question and a response to it.

[Question]
{question}

[Response]
{response}
[End of Response]

Critique request: {request}
Write the critique only."""

REVISION_TEMPLATE = """Revision request: {request}
{keep_answer}Reply with the revised response only, nothing before or after it."""

KEEP_ANSWER = "End the revised response with the final answer line in the form the question asks for.\n"


def critique_messages(question: str, response: str, principle: Principle) -> list[dict[str, str]]:
    """The chat asking for a critique of ``response`` against ``principle`` (one user turn)."""
    return [{"role": "user", "content": CRITIQUE_TEMPLATE.format(
        question=question.strip(), response=response.strip(), request=principle.critique)}]


def revision_messages(question: str, response: str, principle: Principle, critique: str,
                      keyed: bool) -> list[dict[str, str]]:
    """The critique chat continued: the critic's critique as its turn, then the revision request
    (``keyed``: reminded to end with the answer line the verifier reads)."""
    return critique_messages(question, response, principle) + [
        {"role": "assistant", "content": critique.strip()},
        {"role": "user", "content": REVISION_TEMPLATE.format(request=principle.revision,
                                                             keep_answer=KEEP_ANSWER if keyed else "")}]


_LABEL = re.compile(r"^\s*(?:\*\*)?(?:revised response|revision|revised)\s*(?::\s*\*\*|\*\*\s*:|:)\s*",
                    re.IGNORECASE)


def clean_revision(text: str) -> str:
    """The revision's text without a leading ``Revision:`` / ``Revised response:`` label or
    surrounding whitespace (critics often echo the label)."""
    return _LABEL.sub("", text.strip(), count=1).strip()


class PolicyCritic:
    """The policy as its own critic, through the rollout's decoding path
    (:func:`rlhf_workbench.model.rollout.generate`: the chat template, the conversations of a call decoded
    together in batches), sampled at ``temperature`` (0: greedy) after ``torch.manual_seed(seed + i)``
    for call ``i``, so a run is reproducible.

    Args:
        model, tokenizer: the policy and its tokenizer (chat template required).
        temperature: sampling temperature of critiques and revisions.
        mixed_precision: ``"bf16"`` decodes under bf16 autocast, as the rollout does.
        seed: base seed.
        batch_size: conversations decoded together.
    """

    def __init__(self, model, tokenizer, temperature: float = 0.7, mixed_precision: str = "no", seed: int = 0,
                 batch_size: int = 64):
        self.model, self.tokenizer, self.temperature = model, tokenizer, temperature
        self.mixed_precision, self.seed, self.batch_size, self.calls = mixed_precision, seed, batch_size, 0

    def __call__(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """One reply per conversation, at most ``max_tokens`` tokens each, special tokens removed."""
        if not conversations:
            return []
        # a conversation is rendered as an open task's messages would be (Task.chat_messages)
        tasks = [Task(f"critic-{i}", "", "", "open", metadata={"messages": conv}) for i, conv in enumerate(conversations)]
        torch.manual_seed(self.seed + self.calls)
        self.calls += 1
        comps = generate(self.model, self.tokenizer, tasks, 1, self.temperature > 0, self.temperature or 1.0, 1.0,
                         max_tokens, None, self.batch_size, self.mixed_precision)
        return [c.text for c in comps]


def chat_critic(backend) -> Critic:
    """A :class:`~rlhf_workbench.feedback.judge.ChatBackend` (greedy, one call per conversation) as a :data:`Critic`."""
    return lambda conversations, max_tokens: [backend.chat(c, max_tokens) for c in conversations]


@dataclass
class Revision:
    """One critique and revision of a stored trace.

    Attributes:
        task_id, original_id: the task and the revised completion's id.
        principle: the principle's name.
        critique, text: the critic's critique and the (cleaned) revision.
        kept: whether the pair (revision > original) was stored.
        why: the reason it was kept or not (verifier reason, safety flag, judge verdict).
        revision_id: the stored completion's id (kept revisions only).
    """

    task_id: str
    original_id: int
    principle: str
    critique: str
    text: str
    kept: bool = False
    why: str = ""
    revision_id: int | None = None


def select_originals(rollout: Rollout, rankings: Sequence[RankingRow], open_ids: set[str], limit: int,
                     seed: int) -> list[tuple[CompletionRow, RankingRow]]:
    """The traces to revise and their task's ranking, at most ``limit``, one per task (see the
    module docstring): an unranked trace (wrong or flagged), else for an open task (``open_ids``) a
    worst-ranked one when the ranking is not flat; first in stored order. Tasks are taken in the
    order ``random.Random(f"{seed}:{rollout.round}")`` shuffles them to.
    """
    comps = {c.id: c for c in rollout.completions if c.origin != "revision"}
    picks = []
    for rk in rankings:
        ranks = {int(cid): r for cid, r in rk.ranks.items() if int(cid) in comps}
        unranked = [cid for cid, r in ranks.items() if r is None]
        ranked = [r for r in ranks.values() if r is not None]
        worst = [cid for cid, r in ranks.items() if r is not None and r == max(ranked) and max(ranked) > min(ranked)]
        chosen = unranked or (worst if rk.task_id in open_ids else [])
        if chosen:
            picks.append((comps[min(chosen, key=lambda i: comps[i].index)], rk))
    random.Random(f"{seed}:{rollout.round}").shuffle(picks)
    return picks[:limit]


def critique_and_revise(store: Store, rollout: Rollout, tasks_by_id: dict[str, Task], constitution: Constitution,
                        critic: Critic, policy, tokenizer, max_revisions: int = 8, max_new_tokens: int = 128,
                        judge: PairwiseJudge | None = None, safety: Callable[[list[str]], list] | None = None,
                        seed: int = 0, mixed_precision: str = "no") -> list[Revision]:
    """Critique and revise selected traces of a stored, ranked rollout; store the kept pairs.

    For each trace from :func:`select_originals`: a principle drawn with
    ``random.Random(f"{seed}:{rollout.round}:{completion id}")``, a critique
    (:func:`critique_messages`), a revision (:func:`revision_messages`, :func:`clean_revision`),
    then the test of the module docstring (strict verification or the judge in both orders, and
    the safety filter). Kept revisions, their verifications and their pairs are written in one
    transaction; all revisions are recorded in the run meta ``constitution/round_<n>``.

    Args:
        store, rollout: the run's database and the round's rollout (with completions and
            verifications loaded; :meth:`Store.rollout_for_round`), whose rankings are recorded.
        tasks_by_id: the round's tasks (:class:`~rlhf_workbench.tasks.task.Task` with the run's instruction).
        constitution: from :func:`load_constitution`.
        critic: a :data:`Critic` (:class:`PolicyCritic`, or :func:`chat_critic` of a judge backend); called
            twice, once with every critique request, then with every revision request.
        policy, tokenizer: the current policy (log-probs of kept revisions, temperature 1) and its tokenizer.
        max_revisions: at most this many traces revised.
        max_new_tokens: cap of each critique and revision.
        judge: decides open tasks; None keeps no open-task revision.
        safety: ``safety(texts) -> [None | reason]``; a flagged revision is not kept.
        seed: seed of the task order and the principles.
        mixed_precision: ``"bf16"`` computes the log-probs under bf16 autocast.

    Returns:
        One :class:`Revision` per revised trace, in the order revised.

    Raises:
        KeyError: a ranked task is missing from ``tasks_by_id``.
    """
    rankings = store.rankings_for_rollout(rollout.id)
    open_ids = {t for t, task in tasks_by_id.items() if task.is_open}
    picks = select_originals(rollout, rankings, open_ids, max_revisions, seed)
    tasks = [tasks_by_id[o.task_id] for o, _ in picks]
    principles = [random.Random(f"{seed}:{rollout.round}:{o.id}").choice(constitution.principles) for o, _ in picks]
    questions = [task_question(t) for t in tasks]
    critiques = [c.strip() for c in critic([critique_messages(q, o.text, p) for q, (o, _), p
                                           in zip(questions, picks, principles)], max_new_tokens)]
    texts = [clean_revision(r) for r in critic([revision_messages(q, o.text, p, c, not t.is_open) for q, (o, _), p, c, t
                                                in zip(questions, picks, principles, critiques, tasks)], max_new_tokens)]
    out: list[tuple[Revision, RankingRow, object]] = []
    for (original, ranking), task, principle, question, critique, text in zip(picks, tasks, principles, questions,
                                                                               critiques, texts):
        rev = Revision(task.id, original.id, principle.name, critique, text)
        ver = verify(text, task)
        flag = safety([text])[0] if safety is not None and text else None
        if not text or text == original.text.strip():
            rev.why = "empty revision" if not text else "revision identical to the original"
        elif flag:
            rev.why = f"safety filter: {flag}"
        elif not task.is_open:
            rev.kept, rev.why = ver.correct, ("verified" if ver.correct else f"not verified: {ver.reason}")
        elif judge is None:
            rev.why = "open task and no judge source configured"
        else:
            verdict = judge.compare(question, text, original.text)
            rev.kept = verdict.winner == 0
            rev.why = f"judge: {verdict.first}/{verdict.second} (revision first/second)"
        out.append((rev, ranking, ver))
    _store_kept(store, rollout, [(r, rk, v) for r, rk, v in out if r.kept], policy, tokenizer, mixed_precision)
    store.set_meta(f"constitution/round_{rollout.round}", [asdict(r) for r, _, _ in out])
    return [r for r, _, _ in out]


def _store_kept(store: Store, rollout: Rollout, kept: list, policy, tokenizer, mixed_precision: str) -> None:
    """Write kept revisions as completions (``origin="revision"``, real log-probs), their
    verifications and their (revision > original) pairs, in one transaction; sets ``revision_id``."""
    if not kept:
        return
    originals = {c.id: c for c in rollout.completions}
    next_index = {}
    for c in rollout.completions:
        next_index[c.task_id] = max(next_index.get(c.task_id, -1), c.index) + 1
    device = next(policy.parameters()).device
    with store.session() as s, s.begin():
        for rev, ranking, ver in kept:
            orig = originals[rev.original_id]
            ids = tokenizer.encode(rev.text, add_special_tokens=False) + [tokenizer.eos_token_id]
            full = torch.tensor([list(orig.prompt_ids) + ids], device=device)
            with torch.no_grad(), autocast(mixed_precision):
                logps = completion_logps(policy, full, torch.ones_like(full), len(ids))[0].float().tolist()
            row = CompletionRow(rollout_id=rollout.id, task_id=rev.task_id, index=next_index[rev.task_id],
                                text=rev.text, prompt_ids=list(orig.prompt_ids), token_ids=ids, logps=logps,
                                finished=True, origin="revision")
            next_index[rev.task_id] += 1
            s.add(row)
            s.flush()
            s.add(VerificationRow(completion_id=row.id, **vars(ver)))
            s.add(PreferencePair(ranking_id=ranking.id, chosen_id=row.id, rejected_id=orig.id))
            rev.revision_id = row.id


def constitution_round(store: Store, rollout: Rollout, cfg, pair, tasks_by_id: dict[str, Task],
                       algorithm: str) -> dict[str, float]:
    """The loop's one call (after a round's feedback is recorded): build the critic, judge and
    safety filter ``cfg.feedback.constitution`` describes, run :func:`critique_and_revise`, and
    return the round's statistics.

    Args:
        cfg: the :class:`~rlhf_workbench.config.RunConfig` (``feedback.constitution`` not None).
        pair: the :class:`~rlhf_workbench.model.loading.PolicyPair` (its policy is the ``policy`` critic).
        algorithm: this round's update; only ``dpo`` trains on the pairs.

    Returns:
        ``constitution/revisions`` (traces revised), ``constitution/kept`` (pairs stored),
        ``constitution/trained`` (pairs in this round's batch: kept for DPO, else 0),
        ``constitution/judge_calls`` (calls to the judge backend: its verdicts, and its critiques and
        revisions when it is the critic).

    Raises:
        ConstitutionError: the constitution file is missing or malformed.
    """
    c = cfg.feedback.constitution
    constitution = load_constitution(c.path)
    source = next((s for s in cfg.feedback.sources if s.name == "judge"), None)
    backend = judge_backend(source) if source is not None else None
    judge = PairwiseJudge(backend) if backend is not None else None
    calls0 = getattr(backend, "calls", 0)
    if c.critic == "judge":
        critic = chat_critic(backend)
    else:
        critic = PolicyCritic(pair.policy, pair.tokenizer, c.temperature, cfg.model.mixed_precision,
                              seed=cfg.seed * 1000 + rollout.round, batch_size=cfg.rollout.batch_size)
    safety = make_safety_filter(cfg.feedback.safety) if cfg.feedback.safety is not None else None
    try:
        revisions = critique_and_revise(store, rollout, tasks_by_id, constitution, critic, pair.policy, pair.tokenizer,
                                        c.max_revisions_per_round, c.max_new_tokens, judge, safety, cfg.seed,
                                        cfg.model.mixed_precision)
    finally:
        if isinstance(backend, OpenAIChat):
            backend.close()
    kept = sum(r.kept for r in revisions)
    return {"constitution/revisions": float(len(revisions)), "constitution/kept": float(kept),
            "constitution/trained": float(kept if algorithm == "dpo" else 0),
            "constitution/judge_calls": float(getattr(backend, "calls", 0) - calls0)}
