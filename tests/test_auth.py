"""Logins (issue 13, item 7) and roles (item 4) without a server: throttling per username and per
client address, the same answer time for unknown users as for wrong passwords, expiring session
tokens, and which role may do what."""

from __future__ import annotations

import hashlib
import time

import pytest

from rlhf_workbench.human.accounts import authenticate, create_user
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.app.auth import (ExpiringTokens, LoginPolicy, LoginThrottled, NotAllowed, allowed, cookie_id,
                                    login, require)
from rlhf_workbench.store import Store


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture()
def store(tmp_path):
    store = Store(run_dir=tmp_path)
    create_user(store, "ann", "correct horse")
    create_user(store, "boss", "battery staple", role="admin")
    create_user(store, "pg", "playground pw", role="playground")
    return store


def test_unknown_user_takes_as_long_as_a_wrong_password(store):
    """Before: ~4 ms for an unknown user against ~44 ms for a wrong password (a database lookup
    against a scrypt check), so usernames could be enumerated by timing."""
    authenticate(store, "nobody", "warm up the dummy hash")
    unknown, wrong = [], []
    for i in range(5):  # interleaved, so that load on the machine hits both alike
        t = time.perf_counter()
        assert authenticate(store, f"nobody{i}", "guess-123") is None
        unknown.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert authenticate(store, "ann", f"guess-{i}") is None
        wrong.append(time.perf_counter() - t)
    mean_unknown, mean_wrong = sum(unknown) / 5, sum(wrong) / 5
    print(f"unknown user {1000 * mean_unknown:.1f} ms, wrong password {1000 * mean_wrong:.1f} ms")
    assert mean_unknown >= 0.5 * mean_wrong
    assert authenticate(store, "ann", "correct horse").username == "ann"


def test_login_is_throttled_per_username_then_released(store):
    policy = LoginPolicy(max_failures=5, window_s=300, lockout_s=300)
    t0 = 1_000_000.0
    for i in range(5):  # before: 30 wrong guesses, then the right one, all answered
        assert login(store, "ann", f"guess {i}", "10.0.0.1", policy, now=t0 + i) is None
    with pytest.raises(LoginThrottled, match=r"too many failed logins for user 'ann' \(5 within 300 s\): "
                                             r"try again in 29[0-9] s"):
        login(store, "ann", "correct horse", "10.0.0.2", policy, now=t0 + 10)  # right password, other address
    with pytest.raises(LoginThrottled):  # an unknown name is throttled alike: no hint that it does not exist
        for i in range(6):
            login(store, "ghost", f"guess {i}", f"10.0.1.{i}", policy, now=t0 + i)
    assert login(store, "ann", "correct horse", "10.0.0.2", policy, now=t0 + 305).username == "ann"
    # A success clears the username's count: four new failures do not lock it.
    for i in range(4):
        assert login(store, "ann", f"guess {i}", f"10.0.2.{i}", policy, now=t0 + 310 + i) is None
    assert login(store, "ann", "correct horse", "10.0.3.1", policy, now=t0 + 320).username == "ann"


def test_login_is_throttled_per_address(store):
    policy = LoginPolicy(max_failures=5, window_s=300, lockout_s=60)
    t0 = 2_000_000.0
    for i in range(5):  # one address tries five different names
        assert login(store, f"user{i}", "password1", "10.9.9.9", policy, now=t0 + i) is None
    with pytest.raises(LoginThrottled, match="too many failed logins for address 10.9.9.9"):
        login(store, "boss", "battery staple", "10.9.9.9", policy, now=t0 + 6)
    assert login(store, "boss", "battery staple", "10.9.9.8", policy, now=t0 + 6).role == "admin"
    assert login(store, "boss", "battery staple", "10.9.9.9", policy, now=t0 + 70).role == "admin"  # lock over
    # Failures spread wider than the window do not lock.
    for i in range(5):
        assert login(store, "ann", f"guess {i}", "10.8.8.8", policy, now=t0 + 1000 + 100 * i) is None
    assert login(store, "ann", "correct horse", "10.8.8.8", policy, now=t0 + 1401).username == "ann"


def test_session_tokens_expire(monkeypatch, store):
    clock = [100.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    tokens = ExpiringTokens(max_age=60, store=store, initial={"old": "ann"})
    tokens["t1"] = "boss"
    assert tokens.get("t1") == "boss" and "t1" in tokens and tokens["old"] == "ann"
    clock[0] = 161.0
    tokens["t3"] = "pg"
    assert [t for t in list(tokens.keys()) if tokens[t] == "pg"] == [f"sha256:{_digest('t3')}"]  # Gradio's logout
    for t in [t for t in list(tokens.keys()) if tokens[t] == "pg"]:
        del tokens[t]
    assert "t3" not in tokens
    tokens["t3"] = "pg"
    assert len(tokens) == 1 and list(tokens.values()) == ["pg"]
    assert tokens.get("t1") is None and "t1" not in tokens and "old" not in tokens
    with pytest.raises(KeyError):
        tokens["t1"]
    tokens["t2"] = "ann"  # a new login gets its own full age
    clock[0] = 200.0
    assert tokens.get("t2") == "ann"


def test_sessions_are_shared_through_the_database_and_store_no_token(store):
    """Sessions lived in one process: a second table over the same database (another app process,
    or the app after a restart) now sees them, still expiring; only a hash of the token is stored."""
    from rlhf_workbench.store import WebSession

    ExpiringTokens(max_age=60, store=store)["secret-token"] = "boss"
    other = ExpiringTokens(max_age=60, store=Store(store.url))
    assert other.get("secret-token") == "boss" and other.get("other-token") is None
    with store.session() as s:
        assert [r.token_sha256 for r in s.query(WebSession)] == [_digest("secret-token")]
    assert ExpiringTokens(max_age=0.000001, store=Store(store.url)).get("secret-token") is None
    assert cookie_id(store) == cookie_id(Store(store.url))  # the same cookie name in every process


def test_failures_from_elsewhere_cannot_lock_the_owner_out(store):
    """Five wrong passwords from five addresses locked any user for 300 s, repeatable forever; the
    owner now logs in from an address they used before, while a new address still waits."""
    policy = LoginPolicy(max_failures=5, window_s=300, lockout_s=300)
    t0 = 3_000_000.0
    assert login(store, "ann", "correct horse", "10.1.1.1", policy, now=t0).username == "ann"  # her usual address
    for round_ in range(3):  # the attacker repeats the lock-out
        now = t0 + 10 + 400 * round_
        for i in range(5):
            assert login(store, "ann", f"guess {i}", f"10.6.6.{i}", policy, now=now + i) is None
        with pytest.raises(LoginThrottled, match="for user 'ann'"):
            login(store, "ann", "correct horse", "10.7.7.7", policy, now=now + 6)  # an unknown address waits
        assert login(store, "ann", "correct horse", "10.1.1.1", policy, now=now + 7).username == "ann"


def test_a_password_spray_from_one_address_is_throttled(store):
    """One wrong password for each of 20 users from one address: the sixth try on is refused."""
    policy = LoginPolicy(max_failures=5, window_s=300, lockout_s=300)
    outcomes = []
    for i in range(20):
        try:
            outcomes.append(login(store, f"user{i}", "Summer2026!", "10.5.5.5", policy, now=4_000_000.0 + i))
        except LoginThrottled:
            outcomes.append("throttled")
    assert outcomes == [None] * 5 + ["throttled"] * 15


def test_roles(store):
    assert allowed("annotator", "annotate") and not allowed("annotator", "dashboard")
    assert not allowed("annotator", "playground") and allowed("playground", "playground")
    assert not allowed("playground", "annotate") and not allowed("playground", "dashboard")
    assert all(allowed("admin", action) for action in ("annotate", "dashboard", "playground"))
    assert require(store, "boss", "dashboard") > 0
    with pytest.raises(NotAllowed, match="the dashboard needs the role admin; 'ann' is 'annotator'"):
        require(store, "ann", "dashboard")
    with pytest.raises(AnnotationError, match="not logged in"):
        require(store, None, "annotate")
    with pytest.raises(AnnotationError, match="not found"):
        require(store, "deleted-user", "annotate")
    assert create_user(store, "viewer", "password-1", role="playground") > 0
    with pytest.raises(AnnotationError, match="role must be one of"):
        create_user(store, "x", "password-1", role="superuser")
