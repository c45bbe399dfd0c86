"""The project's own exceptions. Adapters translate library errors into these, once."""


class ChatActorsError(Exception):
    """Base of every error this project raises on purpose."""


class TransientError(ChatActorsError):
    """Worth retrying: a connection dropped, a server is busy, a lease is contended.

    `retry_after` (seconds) is a hint from the other side, when it gave one.
    `kind` is a short label for metrics: rate_limit, server_error, connection,
    timeout, stall, protocol, or transient when nothing more is known.
    """

    def __init__(self, message: str, *, retry_after: float | None = None,
                 kind: str = "transient") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind


class PermanentError(ChatActorsError):
    """Retrying will not help: bad request, auth, context length, unknown model.

    `code` is the short machine-readable name put in the client's `error` event.
    """

    def __init__(self, message: str, *, code: str = "permanent") -> None:
        super().__init__(message)
        self.code = code


class LimitReached(PermanentError):
    """A job refused over a budget (`budget_exceeded`) or a rate limit (`rate_limited`);
    `retry_after_s`: when a retry may pass (None: not before the budget's period ends)."""

    def __init__(self, message: str, *, code: str, retry_after_s: float | None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class RequestRefused(PermanentError):
    """The request cannot run as it asks (found only once the job runs, such as tool
    results that answer no pending call): the job ends `rejected`, no model call made."""


class PrefillRefused(PermanentError):
    """The vendor refused a request ending in an assistant turn (a prefill): the
    adapter recognises each vendor's refusal; the provider answers it with a restart."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="prefill_refused")


class Stalled(TransientError):
    """The stream sent nothing for too long; `code` says which limit."""

    def __init__(self, code: str, limit_s: float) -> None:
        super().__init__(f"the model stream stalled for {limit_s:g} s ({code})", kind="stall")
        self.code = code


class ProviderExhausted(TransientError):
    """Every retry and fallback failed; `last` is the final failure."""

    def __init__(self, last: TransientError, tries: int) -> None:
        super().__init__(f"{tries} tries failed; last: {last}", retry_after=last.retry_after,
                         kind=last.kind)
        self.last = last


class DocumentRefused(PermanentError):
    """An uploaded document that cannot be taken as it is; `status` is the HTTP answer,
    `retry_after_s` its Retry-After when trying again later may succeed (503)."""

    def __init__(self, message: str, *, status: int, retry_after_s: int | None = None) -> None:
        super().__init__(message, code="bad_document")
        self.status = status
        self.retry_after_s = retry_after_s


class StreamsRefused(PermanentError):
    """A read over many streams failed for some of them alone (a key holding another
    type, an id Redis refuses): `refused` names each and Redis's reason, `found` is what
    the others read meanwhile. Only the refused streams' clients are ended."""

    def __init__(self, refused: dict[str, str],
                 found: list[tuple[str, list[tuple[str, dict[str, str]]]]]) -> None:
        names = ", ".join(sorted(refused)[:3]) + (", ..." if len(refused) > 3 else "")
        super().__init__(f"redis: {len(refused)} stream(s) cannot be read ({names})",
                         code="stream_read")
        self.refused = refused
        self.found = found
