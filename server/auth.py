"""Who may call what: bearer tokens with roles, scoped to jobs.

A token is a random string the caller sends as `authorization: Bearer <token>`.
The server never holds tokens, only their SHA-256: a token table is text with
one token per line,

    # sha256 of the token (hex)                                      role   jobs  name
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  admin  *     ops
    60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752  writer arith trainer

(`python -m gradmix.server.auth new writer arith trainer` makes a
token and prints its line; `printf %s "$TOKEN" | sha256sum` hashes one you
have.) Roles nest: an `admin` may do what a `writer` may, a `writer` what a
`reader` may. `jobs` is `*` or a comma-separated list of job names; a call on a
job outside it is refused, and ListJobs shows only the jobs in it.

`TokenTable` reads the table from a file (re-read when the file changes, so
tokens rotate without a restart) and from text (an environment variable).
`AuthInterceptor` checks every SelectionService call against `RPC_ROLES`, the
one table of what each RPC needs: a missing or unknown token is
UNAUTHENTICATED, a role or job outside the token's is PERMISSION_DENIED.
Health checks and reflection stay open (probes carry no token; the schema is
public). Tokens are never logged; a token's `name` is.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.errors import InvalidArgumentError
from grpc import aio
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/" + pb.DESCRIPTOR.services_by_name["SelectionService"].full_name + "/"
#: Services callable without a token.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
ALL_JOBS = "*"
#: How often, at most, the token file's modification time is looked at.
RELOAD_CHECK_SECONDS = 1.0
_ECHO_LIMIT = 80


class Role(enum.IntEnum):
    """What a token may do; a higher role may do everything a lower one may."""

    READER = 1
    WRITER = 2
    ADMIN = 3


class TokenTableError(InvalidArgumentError):
    """A token table that cannot be read or parsed (the message names the line)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """One token's rights, as the table grants them."""

    name: str
    role: Role
    jobs: frozenset[str] | None
    """The jobs it may act on; None: every job."""

    def may_access(self, job: str) -> bool:
        return self.jobs is None or job in self.jobs


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the table stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, origin: str) -> dict[str, Identity]:
    """Parse a token table: `<sha256> <role> <jobs> [name]` per line, `#` comments.

    Raises:
        TokenTableError: a malformed line, an unknown role, or a repeated hash.
    """
    table: dict[str, Identity] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{origin}:{number}"
        if len(fields) not in (3, 4):
            raise TokenTableError(f"{where}: want '<sha256> <role> <jobs> [name]', "
                                  f"got {len(fields)} fields")
        digest, role_name, jobs = fields[0].lower(), fields[1].upper(), fields[2]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokenTableError(f"{where}: the first field must be a hex SHA-256 "
                                  "(64 characters), not a token")
        if role_name not in Role.__members__:
            raise TokenTableError(f"{where}: role must be one of "
                                  f"{[r.name.lower() for r in Role]}, got {fields[1]!r}")
        if digest in table:
            raise TokenTableError(f"{where}: the same token hash appears twice")
        names = frozenset(j for j in jobs.split(",") if j)
        if not names:
            raise TokenTableError(f"{where}: jobs must be '*' or a comma-separated list")
        name = fields[3] if len(fields) == 4 else f"{origin}:{number}"
        table[digest] = Identity(name, Role[role_name], None if ALL_JOBS in names else names)
    return table


class TokenTable:
    """The server's tokens: a file (re-read when it changes) plus fixed text.

    Args:
        path: the token file ("" for none).
        text: more lines in the same format (e.g. from GRADMIX_AUTH_TOKENS).

    Raises:
        TokenTableError: the file or text is unreadable or malformed at start-up.
    """

    def __init__(self, path: str = "", text: str = "") -> None:
        self._path = Path(path) if path else None
        self._fixed = parse_tokens(text, "auth_tokens") if text else {}
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._from_file: dict[str, Identity] = {}
        if self._path is not None:
            self._load(self._stat())

    def _stat(self) -> tuple[int, int, int]:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError as exc:
            raise TokenTableError(f"cannot read token file {self._path}: {exc}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, stamp: tuple[int, int, int]) -> None:
        assert self._path is not None
        try:
            text = self._path.read_text()
        except OSError as exc:
            raise TokenTableError(f"cannot read token file {self._path}: {exc}") from exc
        table = parse_tokens(text, str(self._path))
        clash = set(table) & set(self._fixed)
        if clash:
            raise TokenTableError(f"{self._path}: {len(clash)} token hash(es) also in "
                                  "auth_tokens")
        self._from_file, self._stamp = table, stamp

    def refresh(self, now: float | None = None) -> None:
        """Re-read the file if it changed since it was last read (at most once a second).

        A file that became unreadable or malformed keeps the previous tokens
        and logs why, so a bad edit never locks everyone out.
        """
        if self._path is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._load(stamp)
                    log.info("token file %s reloaded: %d token(s)", self._path,
                             len(self._from_file))
            except TokenTableError as exc:
                log.error("token file not reloaded, keeping the previous tokens: %s", exc)

    def __len__(self) -> int:
        return len(self._fixed) + len(self._from_file)

    def identify(self, token: str) -> Identity | None:
        """The identity of `token`, or None if the table does not hold it."""
        self.refresh()
        digest = hash_token(token)
        return self._fixed.get(digest) or self._from_file.get(digest)


# ---------------------------------------------------------------- what each RPC needs

JobOf = Callable[[Any], str]


@dataclass(frozen=True, slots=True)
class Requirement:
    """An RPC's required role and where its request names the job (None: no job)."""

    role: Role
    job_of: JobOf | None


def _field(name: str) -> JobOf:
    return lambda request: str(getattr(request, name))


def _source_job(request: Any) -> str:
    return str(request.source.job)


#: The one table of rights: every SelectionService RPC, its role, its job.
RPC_ROLES: dict[str, Requirement] = {
    "CreateJob": Requirement(Role.ADMIN, _field("name")),
    "GetJob": Requirement(Role.READER, _field("name")),
    "ListJobs": Requirement(Role.READER, None),  # answer filtered to the token's jobs
    "RegisterTask": Requirement(Role.WRITER, _field("job")),
    "ListTasks": Requirement(Role.READER, _field("job")),
    "DeclareAnchor": Requirement(Role.WRITER, _field("job")),
    "CompleteAnchor": Requirement(Role.WRITER, _field("job")),
    "ListAnchors": Requirement(Role.READER, _field("job")),
    "CommitSketch": Requirement(Role.WRITER, _source_job),
    "UploadSketch": Requirement(Role.WRITER, lambda m: str(m.header.source.job)),
    "GetMixture": Requirement(Role.READER, _field("job")),
    "WatchMixture": Requirement(Role.READER, _field("job")),
    "ListMixtures": Requirement(Role.READER, _field("job")),
    "EstimateSubsets": Requirement(Role.READER, _field("job")),
    "SelectTasks": Requirement(Role.READER, _field("job")),
    "ReportTaskFailure": Requirement(Role.WRITER, _field("job")),
    "GetServerInfo": Requirement(Role.READER, None),  # where the store is: no job data
    "UpdateTask": Requirement(Role.ADMIN, _field("job")),  # retire, activate, fix metadata
    "PinMixture": Requirement(Role.ADMIN, _field("job")),
    "UnpinMixture": Requirement(Role.ADMIN, _field("job")),
    "DeleteJob": Requirement(Role.ADMIN, _field("name")),
    "UnarchiveJob": Requirement(Role.ADMIN, _field("name")),
    "ListJobEvents": Requirement(Role.READER, _field("job")),
}

#: The token name of the call being handled (unset: no token checked, e.g. --insecure).
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("gradmix_caller")


def authenticated_caller() -> str | None:
    """The name of the token the current call presented, if the server checks tokens."""
    return _CALLER.get(None)


def _echo(text: str) -> str:
    return repr(text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "...")


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class AuthInterceptor(aio.ServerInterceptor):
    """Checks each call's token against `RPC_ROLES` before the handler runs.

    Args:
        tokens: the token table.
        registry: where `gradmix_auth_denied` (refusals by method and code) lives.
    """

    def __init__(self, tokens: TokenTable, registry: CollectorRegistry) -> None:
        self._tokens = tokens
        self._denied = Counter("gradmix_auth_denied", "Calls refused by the token check, "
                               "by method and status code.", ["method", "code"],
                               registry=registry)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    # ------------------------------------------------------------ checks

    def _identify(self, name: str, context: aio.ServicerContext) -> tuple[Identity, Requirement]:
        requirement = RPC_ROLES.get(name)
        token = _bearer(context.invocation_metadata())
        if token is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED,
                          "missing bearer token (metadata 'authorization: Bearer <token>')")
        identity = self._tokens.identify(token)
        if identity is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if requirement is None:  # a method this table does not know: fail closed
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED, f"{name} is not open to tokens")
        if identity.role < requirement.role:
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          f"token {identity.name!r} has role {identity.role.name.lower()}; "
                          f"{name} needs {requirement.role.name.lower()}")
        return identity, requirement

    @staticmethod
    def _check_job(name: str, identity: Identity, requirement: Requirement,
                   request: Any) -> None:
        if requirement.job_of is None:
            return
        job = requirement.job_of(request)
        if not identity.may_access(job):
            raise _Denied(grpc.StatusCode.PERMISSION_DENIED,
                          f"token {identity.name!r} may not act on job {_echo(job)}")

    async def _refuse(self, name: str, denied: _Denied,
                      context: aio.ServicerContext) -> NoReturn:
        self._denied.labels(name, denied.code.name).inc()
        await context.abort(denied.code, denied.message)
        raise AssertionError("abort returned")

    # ------------------------------------------------------------ handler wrappers

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[-1] if method.startswith(SERVICE_PREFIX) else method
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._client_stream(name, handler.stream_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(name, handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(
            self._refusing_stream(name), **kwargs)

    def _unary(self, name: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: aio.ServicerContext) -> Any:
            try:
                identity, requirement = self._identify(name, context)
                self._check_job(name, identity, requirement, request)
            except _Denied as denied:
                await self._refuse(name, denied, context)
            _CALLER.set(identity.name)
            response = await behavior(request, context)
            if name == "ListJobs" and identity.jobs is not None:
                kept = [job for job in response.jobs if identity.may_access(job.name)]
                del response.jobs[:]
                response.jobs.extend(kept)
            return response

        return call

    def _client_stream(self, name: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            first = None
            try:
                identity, requirement = self._identify(name, context)
                stream = aiter(requests)  # only now: a refused call never starts reading
                first = await anext(stream, None)
                # The header names the job; a stream without one is the handler's to refuse.
                if first is not None and first.WhichOneof("payload") == "header":
                    self._check_job(name, identity, requirement, first)
            except _Denied as denied:
                await self._refuse(name, denied, context)

            async def replay() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for message in stream:
                    yield message

            return await behavior(replay(), context)

        return call

    def _server_stream(self, name: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                identity, requirement = self._identify(name, context)
                self._check_job(name, identity, requirement, request)
            except _Denied as denied:
                await self._refuse(name, denied, context)
            async for response in behavior(request, context):
                yield response

        return call

    def _refusing_stream(self, name: str) -> Callable[..., Any]:
        async def call(requests: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await self._refuse(name, _Denied(grpc.StatusCode.PERMISSION_DENIED,
                                             f"{name} is not open to tokens"), context)
            yield None  # pragma: no cover (abort raised)

        return call


# ---------------------------------------------------------------- making tokens

def new_token_line(role: str, jobs: str, name: str) -> tuple[str, str]:
    """A fresh random token and its token-table line.

    Raises:
        TokenTableError: a bad role or jobs field.
    """
    token = secrets.token_urlsafe(32)
    line = f"{hash_token(token)}  {role.lower()}  {jobs}  {name}"
    parse_tokens(line, "new token")  # refuse what the server would refuse
    return token, line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gradmix.server.auth new ROLE JOBS NAME`: the token on stdout, its line on
    stderr; `... hash` hashes a token read from stdin."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["hash"] and len(args) == 1:
        print(hash_token(sys.stdin.read().strip()))
        return 0
    if args[:1] != ["new"] or len(args) != 4:
        print("usage: python -m gradmix.server.auth new ROLE JOBS NAME | hash < token",
              file=sys.stderr)
        return 2
    try:
        token, line = new_token_line(args[1], args[2], args[3])
    except TokenTableError as exc:
        print(f"gradmix auth: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(line, file=sys.stderr)
    return 0


__all__ = ["RPC_ROLES", "AuthInterceptor", "Identity", "Role", "TokenTable", "TokenTableError",
           "hash_token", "new_token_line", "parse_tokens"]

if __name__ == "__main__":
    sys.exit(main())
