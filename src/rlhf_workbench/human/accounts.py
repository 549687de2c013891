"""Annotator accounts: roles, salted password hashes, creating users and checking logins.

Passwords are stored as salted scrypt hashes (:func:`hash_password`) and compared in constant
time; an unknown username costs as long as a wrong password (:func:`authenticate`). What each
role may do is :data:`rlhf_workbench.app.auth.PERMISSIONS`; login throttling and sessions are
:mod:`rlhf_workbench.app.auth`.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from sqlalchemy import select

from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.store import Store, User

ROLES = ("annotator", "admin", "playground")  # what each may do: rlhf_workbench.app.auth.PERMISSIONS


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Salted scrypt hash (RFC 7914, n=2**14, r=8, p=1) as ``scrypt$<salt hex>$<hash hex>``."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Constant-time comparison of ``password`` with a :func:`hash_password` string."""
    try:
        _, salt, _digest = stored.split("$")
    except ValueError:
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt)), stored)


MIN_PASSWORD_CHARS = 8


def check_new_account(username: str, password: str, role: str = "annotator") -> None:
    """Check an account's fields before anything is created (the CLI calls it before it opens or
    creates the run's database).

    Raises:
        AnnotationError: unknown role, empty username, or a password shorter than
            :data:`MIN_PASSWORD_CHARS` characters; the message names the field.
    """
    if role not in ROLES:
        raise AnnotationError(f"role must be one of {ROLES}, got {role!r}")
    if not username.strip():
        raise AnnotationError("username must not be empty")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AnnotationError(f"password must have at least {MIN_PASSWORD_CHARS} characters, got {len(password)}")


def create_user(store: Store, username: str, password: str, role: str = "annotator") -> int:
    """Create an account; returns its id.

    Raises:
        AnnotationError: unknown role, empty username, password shorter than 8 characters, or
            the username is taken.
    """
    check_new_account(username, password, role)
    with store.session() as s, s.begin():
        if s.scalar(select(User).where(User.username == username)) is not None:
            raise AnnotationError(f"user {username!r} already exists")
        user = User(username=username, password_hash=hash_password(password), role=role)
        s.add(user)
        s.flush()
        return user.id


_DUMMY_HASH: list[str] = []  # a hash to check unknown usernames against (computed once)


def authenticate(store: Store, username: str, password: str) -> User | None:
    """The account if the password matches, else None.

    An unknown username costs one scrypt check too (against a dummy hash), so that it takes as
    long as a wrong password and the answer time does not tell which usernames exist."""
    with store.session() as s:
        user = s.scalar(select(User).where(User.username == username))
    if user is None:
        if not _DUMMY_HASH:
            _DUMMY_HASH.append(hash_password(os.urandom(16).hex()))
        check_password(password, _DUMMY_HASH[0])
        return None
    return user if check_password(password, user.password_hash) else None
