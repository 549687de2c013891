"""Thumbs from deployment: binary feedback on answers that users saw becomes KTO examples.

Two places collect thumbs up / down (:class:`~rlhf_workbench.store.BinaryFeedback`):

- the web app's **Playground** tab (:func:`rlhf_workbench.human.annotation.record_binary_feedback`):
  the question as the user message, the answer of the current policy (tagged with its version)
  or of the reference model (version 0);
- **``rlhf serve-model --run RUNDIR``** (or ``--db URL``): every served chat completion is
  stored as a :class:`~rlhf_workbench.store.ServedCompletion` under its OpenAI response id
  (:func:`record_served`), and ``POST /v1/feedback`` with ``{"id": "<response id>", "label":
  true|false}`` (or ``"thumbs": "up"|"down"``, optional ``"index"`` for a choice of ``n > 1``)
  stores a thumbs row linked to it (:func:`record_served_feedback`).

With ``algorithm: kto`` and ``feedback.thumbs: true`` (the default) the next round's training
batch takes every thumbs row not consumed yet (:func:`consume_thumbs`, called from
``loop._round_batch``): one KTO :class:`~rlhf_workbench.train.samples.Sample` each, desirable iff
thumbs up (Ethayarajh et al. 2024: KTO needs only such unpaired binary labels). Other
algorithms (GRPO, RLOO, PPO, DPO, SFT) leave the rows stored, unconsumed, for a later KTO round,
analysis and export.

Decisions:

- **Prompt tokens**: the conversation the user saw, rendered with the chat template by
  :func:`rlhf_workbench.model.rollout.render_prompt` as the loop renders its tasks (playground: one user
  turn holding the stored prompt, which already carries the answer instruction; serve-model: the
  stored request ``messages``).
- **Completion tokens**: the stored text re-tokenized (no special tokens), with EOS appended when
  the answer ended on its own, as the loop keeps EOS as the last token of a finished trace:
  serve-model knows it (``finish_reason == "stop"``: EOS or a stop string, whose text is cut
  before it, so EOS closes the text the user saw); the playground generates greedily up to
  ``eval.max_new_tokens``, so an answer shorter than that (re-tokenized) is taken as finished.
  A row with no completion token (an empty, cut answer) is consumed but yields no sample.
- **Exactly once**: the rows are marked ``consumed_round = n`` in the transaction that selects
  them; a resumed round ``n`` (crash before version ``n`` was published) takes the rows marked
  ``n`` again plus any new ones, so nothing is lost and no row trains two rounds.
- **One vote per answer**: a second thumbs on the same served choice replaces the first while it
  is unconsumed; once a round trained on it, it is refused (HTTP 409).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from rlhf_workbench.model.rollout import render_prompt
from rlhf_workbench.store import BinaryFeedback, PolicyVersion, ServedCompletion, Store
from rlhf_workbench.tasks.task import Task
from rlhf_workbench.train.samples import Sample


class ThumbsError(Exception):
    """Feedback that cannot be stored; ``status`` is the HTTP status serve-model answers with
    (404 unknown response id or choice, 409 already trained on), ``param`` the request field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class FeedbackStore:
    """Where ``serve-model`` stores served completions and their thumbs.

    Attributes:
        store: the run's database.
        policy_version: the policy version being served (tags every stored completion), or None
            when the served model is not one of the run's published versions.
    """

    store: Store
    policy_version: int | None = None


def _task(messages: list[dict]) -> Task:
    """A task whose :meth:`~rlhf_workbench.tasks.task.Task.chat_messages` are ``messages`` (an open
    task: no answer instruction is added), for rendering and transcripts."""
    return Task(id="thumbs", question="", answer="", answer_type="open",
                metadata={"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})


def conversation_text(messages: list[dict]) -> str:
    """A served conversation as plain text (:meth:`Task.transcript`): the user's message for one
    user turn, else ``"User: ...\\n\\nAssistant: ..."`` turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return _task(messages).transcript()


# --- serve-model's side ------------------------------------------------------------------------
def served_version(store: Store, run_dir: Path | None, model_path: Path) -> int | None:
    """The policy version of ``run_dir`` whose weights ``model_path`` holds, or None.

    ``<run>/checkpoints/vN`` is version ``N`` (when published); ``<run>/policy`` (the final
    policy, written when a run finishes) is the latest version only while the run's status is
    ``done`` at that version (a resumed run may have published newer versions since); any
    other path (a hub model, another run) is None.
    """
    if run_dir is None:
        return None
    run, path = Path(run_dir).resolve(), Path(model_path).resolve()
    if path.parent == run / "checkpoints" and path.name[1:].isdigit():
        version = int(path.name[1:])
        with store.session() as s:
            return version if s.get(PolicyVersion, version) is not None else None
    if path == run / "policy":
        latest, status = store.latest_version(), store.get_meta("status") or {}
        if latest is not None and status.get("state") == "done" and status.get("round") == latest.id:
            return latest.id
    return None


def run_model(store: Store, run_dir: Path) -> tuple[str, int]:
    """What ``serve-model --run`` serves by default: ``(model, version)``, the checkpoint of the
    run's latest published version (the base model named in the run's config for version 0).

    Raises:
        ValueError: the run has no published version, or its latest checkpoint is missing.
    """
    latest = store.latest_version()
    if latest is None:
        raise ValueError(f"--run {run_dir}: no policy version is published yet (start the run first)")
    if latest.id == 0:
        name = ((store.get_meta("config") or {}).get("model") or {}).get("name")
        if not name:
            raise ValueError(f"--run {run_dir}: the run's stored config names no model")
        return name, 0
    ckpt = store.checkpoint_dir(latest)
    if ckpt is None or not Path(ckpt).is_dir():
        raise ValueError(f"--run {run_dir}: the checkpoint of version {latest.id} ({ckpt}) is missing")
    return ckpt, latest.id


def record_served(sink: FeedbackStore, response: dict, messages: list[dict], rendered_prompt: str) -> None:
    """Store every choice of one served chat completion (one transaction).

    Args:
        sink: the database and the served policy version.
        response: the OpenAI ``chat.completion`` object returned to the client (``id``, ``model``,
            ``choices[{index, message{content}, finish_reason}]``).
        messages: the request's turns as ``{"role", "content"}`` (content text).
        rendered_prompt: the chat-templated prompt text the model continued.
    """
    with sink.store.session() as s, s.begin():
        s.add_all(ServedCompletion(response_id=response["id"], index=c["index"], model=response["model"][:300],
                                   messages=messages, rendered_prompt=rendered_prompt,
                                   completion=c["message"]["content"], finish_reason=c["finish_reason"],
                                   policy_version_id=sink.policy_version)
                  for c in response["choices"])


def record_served_feedback(store: Store, response_id: str, index: int, label: bool) -> int:
    """Store a thumbs up (True) / down (False) on choice ``index`` of a served response, with the
    policy version that wrote it; returns the :class:`BinaryFeedback` id. One row per choice
    (a unique index on ``served_id``): a second vote, concurrent or later, replaces the label of
    the first while no round has trained on it.

    Raises:
        ThumbsError: 404 ``id`` not served here (or not stored), 404 ``index`` not a choice of that
            response, 409 the vote was already consumed by a training round.
    """
    with store.session() as s:
        choices = {c.index: c for c in s.scalars(
            select(ServedCompletion).where(ServedCompletion.response_id == response_id))}
    if not choices:
        raise ThumbsError(404, f"id: no chat completion {response_id!r} was served and stored here", "id")
    served = choices.get(index)
    if served is None:
        raise ThumbsError(404, f"index: response {response_id!r} has choices {sorted(choices)}, not {index}", "index")
    row = dict(user_id=None, policy_version_id=served.policy_version_id, prompt=conversation_text(served.messages),
               completion=served.completion, label=bool(label), served_id=served.id)
    fid, consumed = upsert_vote(store, row, BinaryFeedback.served_id == served.id)
    if consumed is not None:
        raise ThumbsError(409, f"id: the feedback on {response_id!r} (choice {index}) was already trained on in "
                               f"round {consumed}; it can no longer be changed", "id")
    return fid


def upsert_vote(store: Store, row: dict, same_answer) -> tuple[int, int | None]:
    """Insert the :class:`BinaryFeedback` ``row`` or, when a vote matching ``same_answer`` (a
    SQLAlchemy condition covered by a unique index) exists, set its label while it is unconsumed.
    Safe under concurrent first votes: the unique index refuses the second insert, which then
    updates. Returns ``(feedback id, consumed_round)``: ``consumed_round`` is None when this vote
    was stored, else the round that trained on the existing vote (which is left as it was)."""
    for _ in range(3):
        try:
            with store.session() as s, s.begin():
                fb = BinaryFeedback(**row)
                s.add(fb)
                s.flush()
                return fb.id, None
        except IntegrityError:
            pass  # a vote on this answer exists: update it
        with store.session() as s, s.begin():
            prior = s.scalars(select(BinaryFeedback).where(same_answer)).first()
            if prior is None:
                continue  # deleted meanwhile: insert again
            changed = s.execute(update(BinaryFeedback).where(BinaryFeedback.id == prior.id,
                                                             BinaryFeedback.consumed_round.is_(None))
                                .values(label=row["label"])).rowcount  # atomic against the loop's marking
            return prior.id, None if changed else prior.consumed_round
    raise RuntimeError("binary_feedback: could neither insert nor update the vote (the row keeps changing)")


# --- the loop's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Thumb:
    """One consumed thumbs row as a training example: the :class:`BinaryFeedback` id, its policy
    version, label and the KTO sample's token ids (``prompt_ids`` ``[P]``, ``token_ids`` ``[T]``)."""

    feedback_id: int
    policy_version: int | None
    label: bool
    prompt_ids: list[int]
    token_ids: list[int]


def _thumb(row: BinaryFeedback, served: ServedCompletion | None, tokenizer, playground_max_tokens: int) -> Thumb | None:
    """The training example of one thumbs row (see the module docstring), None without completion tokens."""
    messages = served.messages if served is not None else [{"role": "user", "content": row.prompt}]
    prompt_ids = render_prompt(tokenizer, _task(messages))
    token_ids = list(tokenizer.encode(row.completion, add_special_tokens=False))
    finished = served.finish_reason == "stop" if served is not None else len(token_ids) < playground_max_tokens
    if finished and tokenizer.eos_token_id is not None:
        token_ids.append(tokenizer.eos_token_id)
    if not token_ids:
        return None
    return Thumb(row.id, row.policy_version_id, bool(row.label), prompt_ids, token_ids)


def consume_thumbs(store: Store, tokenizer, round: int, playground_max_tokens: int) -> list[Thumb]:
    """Mark every unconsumed thumbs row as consumed by ``round`` and return the round's examples
    (those rows plus rows already marked ``round`` by an interrupted attempt), oldest first.

    Args:
        store: the run's database.
        tokenizer: the policy's tokenizer (chat template, EOS).
        round: the round whose batch takes them.
        playground_max_tokens: the playground's generation cap (``eval.max_new_tokens``); a
            playground answer re-tokenized shorter than this is taken as finished (EOS appended).

    Returns:
        One :class:`Thumb` per row that has completion tokens.
    """
    with store.session() as s, s.begin():
        s.execute(update(BinaryFeedback).where(BinaryFeedback.consumed_round.is_(None)).values(consumed_round=round))
        rows = list(s.execute(select(BinaryFeedback, ServedCompletion)
                              .outerjoin(ServedCompletion, BinaryFeedback.served_id == ServedCompletion.id)
                              .where(BinaryFeedback.consumed_round == round).order_by(BinaryFeedback.id)))
    thumbs = [_thumb(fb, served, tokenizer, playground_max_tokens) for fb, served in rows]
    return [t for t in thumbs if t is not None]


def thumbs_batch(store: Store, tokenizer, round: int, playground_max_tokens: int):
    """:func:`consume_thumbs` as KTO samples and their counts: ``(samples, stats)`` with
    ``Sample.label`` True for thumbs up, and ``stats`` ``thumbs_desirable`` /
    ``thumbs_undesirable`` (floats, counts of samples)."""
    thumbs = consume_thumbs(store, tokenizer, round, playground_max_tokens)
    samples = [Sample(t.prompt_ids, t.token_ids, label=t.label) for t in thumbs]
    return samples, {"thumbs_desirable": float(sum(t.label for t in thumbs)),
                     "thumbs_undesirable": float(sum(not t.label for t in thumbs))}
