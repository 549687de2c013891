"""The run's database: every task, rollout, completion, verification, ranking, preference
pair, policy version and metric, as SQLAlchemy models.

SQLite in the run directory by default (WAL journal and a busy timeout, so concurrent
writers wait instead of failing), or any SQLAlchemy URL such as PostgreSQL. Each stage of a
round is written in one transaction, so an interrupted run leaves only whole stages behind
and :func:`rlhf_workbench.run.loop.run` resumes from the last completed round.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
                        create_engine, event, inspect, select, text)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker, validates

from rlhf_workbench.tasks.task import MAX_TASK_ID_LENGTH, Task


def _now() -> datetime:
    return datetime.now(timezone.utc)


class FieldTooLong(ValueError):
    """A string longer than its column's size. Raised before anything is written, the same on every
    database: PostgreSQL refuses such values, SQLite would store them."""


class Base(DeclarativeBase):
    """Declarative base of all workbench tables."""


@event.listens_for(Base, "before_insert", propagate=True)
@event.listens_for(Base, "before_update", propagate=True)
def _check_sizes(mapper, connection, target) -> None:
    """Refuse a string longer than its column's size, naming the table, column and limit."""
    for prop in mapper.column_attrs:
        col = prop.columns[0]
        value = getattr(target, prop.key, None)
        if not isinstance(value, str) or not isinstance(col.type, String):
            continue
        limit = col.type.length
        if limit is not None and len(value) > limit:
            raise FieldTooLong(f"{mapper.local_table.name}.{col.name}: {len(value)} characters long; at most "
                               f"{limit} are allowed ({value[:40]!r}...)")


class TaskRow(Base):
    """A task (question with ground truth) and its split."""

    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(MAX_TASK_ID_LENGTH), primary_key=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    answer_type: Mapped[str] = mapped_column(String(20))
    context: Mapped[str | None] = mapped_column(Text, nullable=True)
    choices: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    split: Mapped[str] = mapped_column(String(10), index=True)

    def to_task(self) -> Task:
        """The :class:`~rlhf_workbench.tasks.task.Task` this row stores."""
        return Task(id=self.id, question=self.question, answer=self.answer, answer_type=self.answer_type,
                    context=self.context, choices=self.choices, metadata=self.meta or {})


class PolicyVersion(Base):
    """A published policy: version 0 is the base model, version n the result of round n."""

    __tablename__ = "policy_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.id"), nullable=True)
    algorithm: Mapped[str] = mapped_column(String(20))
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Rollout(Base):
    """The traces sampled in one round by one policy version, with the sampling settings. A round
    has at most one rollout (unique index ``uq_rollouts_round``)."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("uq_rollouts_round", "round", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, index=True)
    policy_version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"))
    settings: Mapped[dict] = mapped_column(JSON)
    # feedback.selection and each item's informativeness score and reason (rlhf_workbench.human.selection);
    # None: stored before the column existed (served fewest-first)
    selection: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    completions: Mapped[list["CompletionRow"]] = relationship(back_populates="rollout", order_by="CompletionRow.id")


_SAMPLE = text("'sample'")  # CompletionRow.origin's server default, quoted as ALTER TABLE needs it


class CompletionRow(Base):
    """One sampled trace with its token ids and per-token log-probs under the sampling policy."""

    __tablename__ = "completions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    prompt_ids: Mapped[list] = mapped_column(JSON)
    token_ids: Mapped[list] = mapped_column(JSON)
    logps: Mapped[list] = mapped_column(JSON)
    finished: Mapped[bool] = mapped_column(Boolean)
    # "sample": sampled by the policy in the rollout; "revision": a constitutional revision of one
    # (rlhf_workbench.feedback.constitution), stored with its pair but never part of the K samples;
    # "teacher": written by the API model of rollout.teacher (its name in the rollout's settings), with
    # prompt_ids / token_ids under the policy's tokenizer and logps empty (the policy's are unknown)
    origin: Mapped[str] = mapped_column(String(20), default="sample", server_default=_SAMPLE)
    # teacher traces: the endpoint's own {"tokens", "logprobs"} (its tokenizer, nats) when it returned
    # them; None otherwise, and for the policy's samples (their log-probs are ``logps``)
    api_logprobs: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    rollout: Mapped[Rollout] = relationship(back_populates="completions")
    verification: Mapped["VerificationRow"] = relationship(back_populates="completion", uselist=False)


class VerificationRow(Base):
    """The verifier's verdict on a completion (:class:`rlhf_workbench.verify.Verification`):
    ``correct`` is the strict verdict the reward uses, ``lenient_correct`` the separate
    last-number/label metric, ``ambiguous`` a hedged or multiple final answer, ``verdict`` one of
    correct / wrong / ambiguous / unparsed / no_answer / no_key (None in rows written before it
    was stored) and ``why`` the class of an ambiguous or unparsed verdict."""

    __tablename__ = "verifications"
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id"), primary_key=True)
    correct: Mapped[bool] = mapped_column(Boolean)
    format_ok: Mapped[bool] = mapped_column(Boolean)
    extracted: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    ambiguous: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    lenient_correct: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    verdict: Mapped[str | None] = mapped_column(String(20), nullable=True)
    why: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    completion: Mapped[CompletionRow] = relationship(back_populates="verification")

    @validates("verdict")
    def _plain_verdict(self, key: str, value) -> str | None:
        """Store the :class:`~rlhf_workbench.verify.Verdict` enum as its plain string value."""
        return None if value is None else str(value)


class RankingRow(Base):
    """A ranking of one prompt's traces from one source: ``ranks`` maps completion id -> rank
    (0 best, ties allowed, None for wrong traces); ``rewards`` maps completion id -> reward."""

    __tablename__ = "rankings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    source: Mapped[str] = mapped_column(String(50))
    ranks: Mapped[dict] = mapped_column(JSON)
    rewards: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PreferencePair(Base):
    """A DPO pair derived from a ranking: chosen is always a verified-correct trace."""

    __tablename__ = "preference_pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id"), index=True)
    chosen_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))
    rejected_id: Mapped[int] = mapped_column(ForeignKey("completions.id"))


class Metric(Base):
    """A scalar logged during a run (TRL names where the concept is the same)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class User(Base):
    """An annotator or admin account; the password is stored as a salted scrypt hash."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(20))  # "annotator" | "admin" | "playground" (see auth.py)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Annotation(Base):
    """One annotator's work on one item (a task's traces in one rollout).

    ``status`` is ``draft``, ``submitted``, ``skipped`` or ``adjudicated`` (an admin's ranking of an
    item whose annotators disagreed, :mod:`rlhf_workbench.human.adjudication`: the one ranking of that
    item that trains); ``ranks`` maps completion id -> rank
    (0 best, ties allowed) over the verified traces; ``flagged`` lists completion ids marked
    unsafe or clinically wrong (never used as chosen); ``verifier_wrong`` lists verified traces
    (the verifier graded them correct) that the expert marked as actually wrong: treated like
    flagged ones, and counted as the verifier's false accepts in
    :func:`rlhf_workbench.human.annotation.verifier_audit`; ``revision`` increases with every save so
    that a stale draft is refused; ``consumed_round`` is the round whose training read this
    submission (set by the worker in the transaction that records the round's rankings; None
    while pending, for a submission overruled by an adjudication, and for rows written before
    the column existed).
    """

    __tablename__ = "annotations"
    __table_args__ = (UniqueConstraint("rollout_id", "task_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(20))
    ranks: Mapped[dict] = mapped_column(JSON, default=dict)
    rationale: Mapped[str] = mapped_column(Text, default="")
    flagged: Mapped[list] = mapped_column(JSON, default=list)
    verifier_wrong: Mapped[list | None] = mapped_column(JSON, nullable=True, default=list)  # None: older rows
    revision: Mapped[int] = mapped_column(Integer, default=0)
    consumed_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class ItemClaim(Base):
    """An annotator's place on an item (a task's traces in one rollout), written when the item is
    served (:mod:`rlhf_workbench.human.assignment`).

    ``slot`` is unique per item and below ``feedback.annotators_per_item``, so the database itself
    refuses one annotator too many; ``expires_at`` (seconds since the epoch) frees an abandoned
    place, and is None once the annotator submitted or skipped the item (the place is kept).
    """

    __tablename__ = "item_claims"
    __table_args__ = (UniqueConstraint("rollout_id", "task_id", "user_id"),
                      UniqueConstraint("rollout_id", "task_id", "slot"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    slot: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class LoginAttempt(Base):
    """One login attempt (for throttling, :mod:`rlhf_workbench.app.auth`): the name tried (cut to 200
    characters), the client address when known, success, and when (seconds since the epoch)."""

    __tablename__ = "login_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(200), index=True)
    address: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    at: Mapped[float] = mapped_column(Float, index=True)


class ServedCompletion(Base):
    """One choice of a chat completion answered by ``rlhf serve-model --run/--db``
    (:mod:`rlhf_workbench.feedback.thumbs`): the OpenAI response id and choice index, the request's
    ``messages`` (a list of ``{"role", "content"}``), the prompt as the chat template rendered it,
    the answer text, OpenAI's ``finish_reason`` (``"stop"``: EOS or a stop string, ``"length"``:
    cut by ``max_tokens``) and the policy version served (None when the served model is not one
    of the run's versions)."""

    __tablename__ = "served_completions"
    __table_args__ = (UniqueConstraint("response_id", "index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(100), index=True)
    index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(300))
    messages: Mapped[list] = mapped_column(JSON)
    rendered_prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(20))
    policy_version_id: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class BinaryFeedback(Base):
    """A thumbs up (``label`` True) / down on an answer, tied to the policy version that wrote it:
    from the app's playground (``prompt`` the user message, ``served_id`` None) or on a
    :class:`ServedCompletion` of ``rlhf serve-model`` (``served_id`` set; ``prompt`` its
    conversation as text). With ``algorithm: kto`` the next round trains on the rows not yet
    consumed and sets ``consumed_round`` (:mod:`rlhf_workbench.feedback.thumbs`); other algorithms leave
    them stored (None) for analysis and export.

    One vote per answer, enforced by unique indexes (so concurrent first votes cannot store two
    rows): one row per served choice (``served_id``), and one per user and playground answer
    (``user_id``, ``answer_key``: a hash of the version, prompt and answer; None on served rows)."""

    __tablename__ = "binary_feedback"
    __table_args__ = (Index("uq_binary_feedback_served", "served_id", unique=True),
                      Index("uq_binary_feedback_user_answer", "user_id", "answer_key", unique=True))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    policy_version_id: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.id"), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    label: Mapped[bool] = mapped_column(Boolean)
    served_id: Mapped[int | None] = mapped_column(ForeignKey("served_completions.id"), nullable=True, index=True)
    answer_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    consumed_round: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class WebSession(Base):
    """A logged-in web-app session (:mod:`rlhf_workbench.app.auth`): the SHA-256 of the cookie
    token (the token itself is never stored), the username and when it was issued (seconds since
    the epoch). In the database, so a session is valid on every app process over it and survives a
    restart; it expires ``app.session_max_age_s`` after ``issued_at``."""

    __tablename__ = "web_sessions"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(100), index=True)
    issued_at: Mapped[float] = mapped_column(Float, index=True)


class GuidelinesAck(Base):
    """An annotator's acknowledgement of the annotation guidelines (``feedback.guidelines``,
    :mod:`rlhf_workbench.human.guidelines`): ``sha256`` of the guidelines text they read and clicked
    "Start" on, and when (UTC). Changed guidelines have another hash, so everyone reads them again."""

    __tablename__ = "guidelines_acks"
    __table_args__ = (UniqueConstraint("user_id", "sha256"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    acknowledged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RunMeta(Base):
    """Key/value facts about the run (its config, start time)."""

    __tablename__ = "run_meta"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


def make_engine(url: str) -> Engine:
    """Engine for ``url``; SQLite gets WAL, a 30 s busy timeout and foreign keys on."""
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add columns that the models gained since an existing database was created.

    ``create_all`` creates missing tables but never alters existing ones, so a run directory
    written by an older version would fail on the first query touching a new column. Each
    missing column is added with ``ALTER TABLE ... ADD COLUMN`` and its server default (new
    columns must have one or be nullable); works on SQLite and PostgreSQL.
    """
    insp = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if not insp.has_table(table.name):
                continue
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                ddl = col.type.compile(dialect=engine.dialect)
                default = col.server_default.arg if col.server_default is not None else None
                if isinstance(col.type, Boolean) and default is not None and engine.dialect.name == "postgresql":
                    default = "false" if str(default) in ("0", "false") else "true"
                clause = f" DEFAULT {default}" if default is not None else ""
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}{clause}'))


UNIQUE_INDEXES = (  # (name, table, columns) that create_all adds only to new tables
    ("uq_rollouts_round", "rollouts", "round"),
    ("uq_binary_feedback_served", "binary_feedback", "served_id"),
    ("uq_binary_feedback_user_answer", "binary_feedback", "user_id, answer_key"),
)


def _add_unique_indexes(engine: Engine) -> None:
    """Give a database created before them the :data:`UNIQUE_INDEXES` (``create_all`` adds no
    index to an existing table). A database that already holds duplicates (two rollouts of one
    round written by two concurrent runs before the run lock; two votes on one answer stored
    before votes were unique) keeps working without that index, with a warning."""
    for name, table, columns in UNIQUE_INDEXES:
        try:
            with engine.begin() as conn:
                conn.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))
        except DBAPIError as e:
            import warnings

            if any(ix["name"] == name for ix in inspect(engine).get_indexes(table)):
                continue  # another process created it at the same moment
            warnings.warn(f"{engine.url.render_as_string(hide_password=True)}: {table} holds duplicate "
                          f"({columns}) rows written by an older version; they are not unique there "
                          f"({type(e.orig).__name__})", stacklevel=3)


class Store:
    """The run's database: open (creating tables) and write whole stages in transactions.

    Args:
        url: SQLAlchemy URL, or None for ``sqlite:///<run_dir>/workbench.db``.
        run_dir: default location of the SQLite file.
    """

    def __init__(self, url: str | None = None, run_dir: str | Path | None = None):
        if url is None:
            if run_dir is None:
                raise ValueError("Store needs a url or a run_dir")
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(run_dir) / 'workbench.db'}"
        self.url = url
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        _add_unique_indexes(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        """A new session; use ``with store.session() as s, s.begin(): ...`` for one transaction."""
        return self.Session()

    # --- tasks -----------------------------------------------------------------------------
    def add_tasks(self, tasks: list[Task], split: str) -> None:
        """Insert tasks that are not stored yet (idempotent on id).

        Raises:
            ValueError: a stored task with the same id has another question, answer or split.
        """
        with self.session() as s, s.begin():
            existing = {r.id: r for r in s.scalars(select(TaskRow).where(TaskRow.id.in_([t.id for t in tasks])))}
            for t in tasks:
                row = existing.get(t.id)
                if row is not None:
                    if (row.question, row.answer, row.split) != (t.question, t.answer, split):
                        raise ValueError(f"task {t.id!r} is stored with another question/answer/split")
                    continue
                s.add(TaskRow(id=t.id, question=t.question, answer=t.answer, answer_type=t.answer_type,
                              context=t.context, choices=t.choices, meta=dict(t.metadata), split=split))

    def tasks(self, split: str) -> list[Task]:
        """Stored tasks of a split, ordered by id."""
        with self.session() as s:
            return [r.to_task() for r in s.scalars(select(TaskRow).where(TaskRow.split == split).order_by(TaskRow.id))]

    def prompts(self, task_ids) -> dict[str, str]:
        """The user message each task was shown with in this run: :meth:`Task.prompt` with the run
        config's ``tasks.instruction`` applied when it overrides the default (a multi-turn open
        task: its whole conversation, :meth:`Task.transcript`).

        Raises:
            KeyError: a task id that is not stored.
        """
        from dataclasses import replace

        instruction = ((self.get_meta("config") or {}).get("tasks") or {}).get("instruction")
        ids = set(task_ids)
        with self.session() as s:
            rows = {r.id: r for r in s.scalars(select(TaskRow).where(TaskRow.id.in_(ids)))}
        missing = ids - set(rows)
        if missing:
            raise KeyError(f"tasks not stored: {sorted(missing)[:5]}")
        return {i: replace(r.to_task(), instruction=instruction or None).transcript() for i, r in rows.items()}

    # --- policy versions and metrics ---------------------------------------------------------
    def checkpoint_dir(self, version: PolicyVersion) -> str | None:
        """Where ``version``'s checkpoint is: stored relative to the run directory (since the run
        directory may be given relative to another cwd, or mounted elsewhere on another machine),
        so resolved against this store's ``run_dir``; an absolute path (older runs) as stored."""
        if not version.checkpoint:
            return None
        return str(self.run_dir / version.checkpoint) if self.run_dir is not None else version.checkpoint

    def latest_version(self) -> PolicyVersion | None:
        """The newest published policy version, or None."""
        with self.session() as s:
            return s.scalars(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1)).first()

    def versions(self) -> list[PolicyVersion]:
        """All published policy versions, oldest first."""
        with self.session() as s:
            return list(s.scalars(select(PolicyVersion).order_by(PolicyVersion.id)))

    def publish_version(self, version: int, parent: int | None, algorithm: str, checkpoint: str | None,
                        metrics: dict[str, float], round: int) -> None:
        """Record a policy version and its round metrics in one transaction."""
        with self.session() as s, s.begin():
            s.add(PolicyVersion(id=version, parent_id=parent, algorithm=algorithm, checkpoint=checkpoint,
                                metrics=metrics))
            for k, v in metrics.items():
                s.add(Metric(round=round, name=k, value=float(v)))

    def metrics(self) -> dict[str, list[tuple[int, float]]]:
        """All metrics as ``name -> [(round, value), ...]`` in round order."""
        out: dict[str, list[tuple[int, float]]] = {}
        with self.session() as s:
            for m in s.scalars(select(Metric).order_by(Metric.round, Metric.id)):
                out.setdefault(m.name, []).append((m.round, m.value))
        return out

    # --- run metadata --------------------------------------------------------------------------
    def get_meta(self, key: str, default=None):
        """A stored run fact, or ``default``."""
        with self.session() as s:
            row = s.get(RunMeta, key)
            return default if row is None else row.value

    def set_meta(self, key: str, value) -> None:
        """Store a JSON-serialisable run fact."""
        json.dumps(value)
        with self.session() as s, s.begin():
            s.merge(RunMeta(key=key, value=value))

    # --- rollouts -------------------------------------------------------------------------------
    def rollout_for_round(self, round: int) -> Rollout | None:
        """The stored rollout of a round (with completions, verifications), or None."""
        from sqlalchemy.orm import selectinload

        with self.session() as s:
            return s.scalars(
                select(Rollout).where(Rollout.round == round)
                .options(selectinload(Rollout.completions).selectinload(CompletionRow.verification))
            ).first()

    def rankings_for_rollout(self, rollout_id: int) -> list[RankingRow]:
        """Rankings recorded for a rollout."""
        with self.session() as s:
            return list(s.scalars(select(RankingRow).where(RankingRow.rollout_id == rollout_id).order_by(RankingRow.id)))

    def pairs_for_rollout(self, rollout_id: int) -> list[PreferencePair]:
        """Preference pairs derived from a rollout's rankings."""
        with self.session() as s:
            return list(s.scalars(
                select(PreferencePair).join(RankingRow, PreferencePair.ranking_id == RankingRow.id)
                .where(RankingRow.rollout_id == rollout_id).order_by(PreferencePair.id)
            ))
