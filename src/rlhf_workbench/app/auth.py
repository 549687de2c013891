"""Who may use the web app, and for what: roles, login throttling and session expiry.

- **Roles** (``users.role``, set by ``rlhf user add --role``): ``annotator`` annotates;
  ``playground`` may ask the policy questions in the Playground; ``admin`` may do everything,
  including the Dashboard (every annotator's name and rate). The Gradio app checks the role of
  the logged-in user in every handler (:func:`require`), so calling a handler directly through
  the queue API (``/gradio_api/queue/join``, ``/gradio_api/call/...``, ``gradio_client``) gets
  nothing a page would not show. Users and exports are managed with the CLI (``rlhf user add``,
  ``rlhf export``), which needs access to the database, not a login.
- **Login throttling** (:func:`login`): after ``app.login_max_failures`` failed logins within
  ``app.login_window_s`` for one username, or from one client address, further logins for it are
  refused for ``app.login_lockout_s`` with a message that says so (HTTP 429), even with the right
  password. Attempts are recorded in the database (``login_attempts``), so the limit holds
  across app processes. A success clears the username's count, not the address's. The address
  is the TCP peer (:class:`SessionMiddleware` hands it to the login check): behind a reverse
  proxy every client shares the proxy's address, so set the limit with that in mind.
- **Unknown usernames** take as long as wrong passwords
  (:func:`rlhf_workbench.human.accounts.authenticate` checks a dummy hash).
- **Session expiry**: a login is valid for ``app.session_max_age_s``; after that every call of
  the session is answered 401 and the page shows the login form again
  (:class:`ExpiringTokens`, installed by :class:`SessionMiddleware` in place of Gradio's token
  table).
- **Every route but the login page needs a session** (:class:`SessionMiddleware`), whatever
  Gradio itself checks.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

from sqlalchemy import delete, select

from rlhf_workbench.human.accounts import authenticate
from rlhf_workbench.human.errors import AnnotationError
from rlhf_workbench.store import LoginAttempt, Store, User

PERMISSIONS = {
    "annotate": ("annotator", "admin"),
    "dashboard": ("admin",),
    "adjudicate": ("admin",),  # settle annotators' disagreements (rlhf_workbench.human.adjudication)
    "playground": ("playground", "admin"),
}
NO_SESSION = "Your session has expired or you are not logged in: reload the page and log in again."

CLIENT_ADDRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_address", default=None)


class NotAllowed(AnnotationError):
    """The logged-in user's role does not allow this action; nothing was read or written."""


# --- roles ---------------------------------------------------------------------------------------
def allowed(role: str | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (a key of :data:`PERMISSIONS`)."""
    return role in PERMISSIONS[action]


def require(store: Store, username: str | None, action: str) -> int:
    """The id of the logged-in user ``username`` if their role allows ``action``.

    Raises:
        AnnotationError: no session, or the account no longer exists.
        NotAllowed: the role does not allow ``action``.
    """
    if not username:
        raise AnnotationError(NO_SESSION)
    with store.session() as s:
        row = s.execute(select(User.id, User.role).where(User.username == username)).first()
    if row is None:
        raise AnnotationError(f"{NO_SESSION} (account {username!r} not found)")
    if not allowed(row.role, action):
        who = " or ".join(PERMISSIONS[action])
        raise NotAllowed(f"not allowed: the {action} needs the role {who}; {username!r} is {row.role!r}")
    return row.id


def role_of(store: Store, username: str | None) -> str | None:
    """The role of an account, or None when there is no such account."""
    if not username:
        return None
    with store.session() as s:
        return s.scalar(select(User.role).where(User.username == username))


def request_username(request) -> str | None:
    """The username logged in on a Gradio request (``gr.Request.username``); None without a
    request or a session."""
    return getattr(request, "username", None) if request is not None else None


def request_user(store: Store, request, action: str = "annotate") -> int:
    """The id of the user logged in on a Gradio ``request`` if their role allows ``action``
    (:func:`require` on :func:`request_username`).

    Raises:
        AnnotationError: no session, or the account no longer exists.
        NotAllowed: the role does not allow ``action``.
    """
    return require(store, request_username(request), action)


# --- login throttling ------------------------------------------------------------------------------
@dataclass
class LoginPolicy:
    """Limits on failed logins (the ``app:`` block of the run config)."""

    max_failures: int = 5
    window_s: float = 300.0
    lockout_s: float = 300.0

    @classmethod
    def from_config(cls, app_cfg) -> LoginPolicy:
        """The policy of a :class:`rlhf_workbench.config.AppConfig`."""
        return cls(app_cfg.login_max_failures, app_cfg.login_window_s, app_cfg.login_lockout_s)


class LoginThrottled(Exception):
    """Logins for this username or from this address are refused for now; ``str()`` says why and
    for how long."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _locked_until(s, column, value, policy: LoginPolicy, since: float) -> float | None:
    """When the lock on ``column == value`` ends, if ``max_failures`` failures after ``since`` fell
    within ``window_s`` and the last of them is less than ``lockout_s`` ago; else None."""
    times = list(s.scalars(select(LoginAttempt.at).where(column == value, LoginAttempt.ok.is_(False),
                                                         LoginAttempt.at > since)
                           .order_by(LoginAttempt.at.desc()).limit(policy.max_failures)))
    if len(times) < policy.max_failures or times[0] - times[-1] > policy.window_s:
        return None
    return times[0] + policy.lockout_s


def login(store: Store, username: str, password: str, address: str | None = None,
          policy: LoginPolicy | None = None, now: float | None = None) -> User | None:
    """Check a login with throttling; the account on success, None for a wrong password or an
    unknown user (indistinguishable, also in time).

    Raises:
        LoginThrottled: too many recent failures for this username or from this address; the
            password was not checked and the attempt is not counted.
    """
    policy = policy or LoginPolicy()
    now = time.time() if now is None else now
    name = username[:200]
    with store.session() as s:
        last_ok = s.scalar(select(LoginAttempt.at).where(LoginAttempt.username == name, LoginAttempt.ok.is_(True))
                           .order_by(LoginAttempt.at.desc()).limit(1)) or 0.0
        until = _locked_until(s, LoginAttempt.username, name, policy, last_ok)
        what = f"user {name!r}"
        if (until is None or until <= now) and address:
            until = _locked_until(s, LoginAttempt.address, address, policy, 0.0)
            what = f"address {address}"
    if until is not None and until > now:
        wait = until - now
        raise LoginThrottled(f"too many failed logins for {what} ({policy.max_failures} within "
                             f"{policy.window_s:.0f} s): try again in {wait:.0f} s", wait)
    user = authenticate(store, username, password)
    with store.session() as s, s.begin():
        s.add(LoginAttempt(username=name, address=(address or None) and address[:100], ok=user is not None, at=now))
        keep = max(policy.window_s, policy.lockout_s) * 4
        s.execute(delete(LoginAttempt).where(LoginAttempt.at < now - keep, LoginAttempt.ok.is_(False)))
    return user


# --- sessions --------------------------------------------------------------------------------------------
class ExpiringTokens(dict):
    """Gradio's session table (cookie token -> username) whose entries expire ``max_age`` seconds
    after the login that made them: an expired token reads as absent, so Gradio answers 401."""

    def __init__(self, max_age: float, initial: dict | None = None):
        super().__init__()
        self.max_age = max_age
        self.issued: dict[str, float] = {}
        for k, v in (initial or {}).items():
            self[k] = v

    def __setitem__(self, token, username) -> None:
        self.issued[token] = time.time()
        super().__setitem__(token, username)

    def _expired(self, token) -> bool:
        issued = self.issued.get(token)
        if issued is not None and time.time() - issued > self.max_age:
            super().pop(token, None)
            self.issued.pop(token, None)
            return True
        return False

    def get(self, token, default=None):
        """The username of a live token, else ``default``."""
        return default if self._expired(token) else super().get(token, default)

    def __getitem__(self, token):
        if self._expired(token):
            raise KeyError(token)
        return super().__getitem__(token)

    def __contains__(self, token) -> bool:
        return not self._expired(token) and super().__contains__(token)

    def __delitem__(self, token) -> None:
        self.issued.pop(token, None)
        super().__delitem__(token)

    def _purge(self) -> None:
        for token in [t for t in super().keys() if t in self.issued]:
            self._expired(token)

    def keys(self):
        """Live tokens (Gradio's logout walks them and indexes each)."""
        self._purge()
        return super().keys()

    def items(self):
        """Live (token, username) pairs."""
        self._purge()
        return super().items()

    def values(self):
        """Usernames of live tokens."""
        self._purge()
        return super().values()

    def __iter__(self):
        self._purge()
        return super().__iter__()

    def __len__(self) -> int:
        self._purge()
        return super().__len__()


# Shows a too-many-failures answer (HTTP 429, with the reason) on Gradio's login form, which by
# itself reports only HTTP 400 ("Incorrect credentials"). Added to the page by SessionMiddleware:
# Gradio's own head= reaches the page only after login.
LOGIN_PAGE_JS = """
<script>
(() => {
  const fetch0 = window.fetch;
  window.fetch = async (...args) => {
    const res = await fetch0(...args);
    const url = String(args[0] && args[0].url || args[0]);
    if (!/\\/login\\/?$/.test(url.split('?')[0])) return res;
    let box = document.querySelector('#login-throttled');
    if (res.status !== 429) { if (box) box.remove(); return res; }
    let msg = 'Too many failed logins: try again later.';
    try { msg = (await res.clone().json()).detail || msg; } catch (e) {}
    if (!box) {
      box = document.createElement('p');
      box.id = 'login-throttled';
      box.style.color = 'var(--error-text-color, #b91c1c)';
      const btn = [...document.querySelectorAll('button')].find((b) => /log ?in/i.test(b.textContent));
      if (btn && btn.parentElement) btn.parentElement.insertBefore(box, btn); else document.body.prepend(box);
    }
    box.textContent = msg;
    return res;
  };
})();
</script>
"""


# What the login page itself loads: everything else needs a live session.
PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico",
                          "/manifest.json", "/robots.txt", "/theme.css", "/gradio_api/theme.css",
                          "/gradio_api/startup-events"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


class SessionMiddleware:
    """ASGI middleware for the Gradio app.

    - Replaces Gradio's token table with :class:`ExpiringTokens` before the first request is
      served, so sessions expire after ``max_age`` seconds.
    - Answers 401 to any request without a live session except for the login page and its
      static files (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIXES`): Gradio checks the login on
      most of its routes, this makes it every route, including ones a later Gradio adds.
    - Puts the client's address where the login check can read it (:data:`CLIENT_ADDRESS`;
      Gradio's ``auth=`` callback gets only a username and a password).
    - Adds :data:`LOGIN_PAGE_JS` to the page, so that the login form says why a throttled login
      was refused.
    """

    def __init__(self, app, max_age: float):
        self.app = app
        self.max_age = max_age

    def _logged_in(self, gradio_app, scope) -> bool:
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(gradio_app, "cookie_id", None)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token and gradio_app.tokens.get(token) is not None:
                return True
        return False

    async def __call__(self, scope, receive, send):
        """Handle one ASGI connection."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        gradio_app = scope.get("app")
        if gradio_app is not None and hasattr(gradio_app, "tokens") \
                and not isinstance(gradio_app.tokens, ExpiringTokens):
            gradio_app.tokens = ExpiringTokens(self.max_age, gradio_app.tokens)
        path = scope.get("path", "")
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if not public and gradio_app is not None and getattr(gradio_app, "auth", None) is not None \
                and not self._logged_in(gradio_app, scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": {"error": "Not authenticated", "auth_message": NO_SESSION}},
                               status_code=401)(scope, receive, send)
            return
        client = scope.get("client")
        reset = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            if path == "/" and scope.get("method") == "GET":
                await self.app(scope, receive, _with_login_script(send))
            else:
                await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(reset)


def _with_login_script(send):
    """``send`` for the page's HTML, with :data:`LOGIN_PAGE_JS` added to its head."""
    from starlette.datastructures import MutableHeaders

    start, body = None, []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            await send(message)
            return
        body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        headers = MutableHeaders(raw=list(start["headers"]))
        data = b"".join(body)
        if "text/html" in headers.get("content-type", "") and "content-encoding" not in headers:
            data = data.replace(b"</head>", LOGIN_PAGE_JS.encode() + b"</head>", 1)
            headers["content-length"] = str(len(data))
        await send({**start, "headers": headers.raw})
        await send({"type": "http.response.body", "body": data})

    return wrapped
