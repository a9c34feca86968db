"""Every Redis name Streamgate uses, in one place.

On a Redis of its own, all keys of one job carry the hash tag ``{<job_id>}``; in a Redis
Cluster every key of a shard carries that shard's tag instead (``Keys``). Either way the
functions of the library (streamgate.lua) may touch them together.
"""

from __future__ import annotations

QUEUE_NAME = "sg:queue"  # arq's queue: a sorted set of job ids, owned by arq
PENDING = "sg:pending"  # arq job ids enqueued and not yet started, scored by enqueue time
# (ms, Redis's clock); the janitor ends and removes those past QUEUE_TIMEOUT_S
WAKE = "sg:wake"  # per job enqueued: its arq id, or "<arq id> <enqueued ms> <request JSON>"
# for a new job whose request is small; idle workers block on it (capped list)
WAKE_CAP = 1024  # as many as MAX_QUEUED_JOBS (1000) by default: a trimmed wake-up waits for
# the fallback poll (POLL_AFTER_S); at most 16 MB of requests
WAKE_REQUEST_MAX = 16_384  # bytes of request a wake-up carries, at most
ACTIVITY = "sg:activity"  # the doorbell: every write to a job's stream adds that stream's
# key here, so a gateway relaying thousands of streams blocks on this one (capped) stream
RUNNING = "sg:running"  # running attempts, "<job id> <owner>", scored by when their heartbeat
# lapses (ms, Redis's clock): an attempt is alive while its score is ahead, and the janitor
# finds a dead worker's job that nobody reads
ENDED = "sg:ended"  # pub/sub channel: the id of each job ended from outside (DELETE), so
# that its worker stops the upstream request at once rather than at its next heartbeat
WORKERS = "sg:workers"  # worker names scored by when their heartbeat lapses (ms), idle ones
# too: a dead worker's job goes back to the queue only while some worker is alive to take it
JANITOR = "sg:janitor"  # the gateway now sweeping for the fleet (gateway/janitor.py), a lease
TOOL_CATALOGS = "sg:tool-catalogs"  # names of the workers that published their tools (a set;
# a name whose catalog key has expired is dropped by the next reader)


def events_key(job_id: str) -> str:
    """The job's event stream; expires STREAM_RETENTION_S after its final event."""
    return f"sg:{{{job_id}}}:events"


def meta_key(job_id: str) -> str:
    """The job's state (kind, owning attempt, published, final); expires with the stream."""
    return f"sg:{{{job_id}}}:meta"


def deadline_key(job_id: str) -> str:
    """Exists while the job may still start: it lives QUEUE_TIMEOUT_S from the enqueue."""
    return f"sg:{{{job_id}}}:deadline"


def watched_key(job_id: str) -> str:
    """Renewed by every gateway relaying the job; lives DISCONNECT_GRACE_S unless renewed."""
    return f"sg:{{{job_id}}}:watched"


def tool_catalog_key(worker: str) -> str:
    """The tools a worker offers (JSON); lives CATALOG_TTL_S unless the worker renews it."""
    return f"sg:tools:{worker}"


def aisdk_chat_key(identity: str, chat_id: str) -> str:
    """An AI SDK chat's active answer (a job id), per API key digest; lives as long as a new
    job's keys (timing.Timing.queued_ttl_s)."""
    return f"sg:aisdk:{{{identity}:{chat_id}}}:active"


def session_key(session: str) -> str:
    """A session's turns (JSON list entries); capped in length, expires SESSION_RETENTION_S
    after its last turn."""
    return f"sg:session:{{{session}}}:turns"


def session_lock_key(session: str) -> str:
    """The job now answering in a session (409 for another); expires with JOB_TIMEOUT_S."""
    return f"sg:session:{{{session}}}:lock"


def rate_key(who: str) -> str:
    """A caller's chats of the last minute (gateway/access.py), one member each."""
    return f"sg:rate:{{{who}}}"


def usage_key(identity: str) -> str:
    """A key's token usage, fields ``<day>|<model>|<figure>`` (days since 1970, Redis's
    UTC); expires 400 days after its last job."""
    return f"sg:usage:{{{identity or '-'}}}"


class Keys:
    """The names of one shard's keys. A shard of a Redis Cluster has a hash ``tag``, and
    every one of its keys carries it, so that they all hash to one slot: the library's
    functions and arq's transactions touch several at once. A shard that is a Redis of its
    own has no tag and the names above."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        base = f"sg:{{{tag}}}:" if tag else "sg:"
        self.queue = base + QUEUE_NAME.removeprefix("sg:")
        self.pending = base + PENDING.removeprefix("sg:")
        self.wake = base + WAKE.removeprefix("sg:")
        self.activity = base + ACTIVITY.removeprefix("sg:")
        self.running = base + RUNNING.removeprefix("sg:")
        self.ended = base + ENDED.removeprefix("sg:")
        self.workers = base + WORKERS.removeprefix("sg:")
        self.janitor = base + JANITOR.removeprefix("sg:")
        self.tool_catalogs = base + TOOL_CATALOGS.removeprefix("sg:")
        self._base = base

    def _tagged(self, plain: str) -> str:
        """``plain`` (``sg:...{x}...``) in this shard: its own tag becomes part of the name."""
        if not self.tag:
            return plain
        return self._base + plain.removeprefix("sg:").replace("{", "").replace("}", "")

    def events(self, job_id: str) -> str:
        return self._tagged(events_key(job_id))

    def job_of_events(self, key: bytes) -> str:
        """The job of one of this shard's events stream keys (as ``events`` names them)."""
        if self.tag:
            return key[len(self._base) :].split(b":", 1)[0].decode()
        return key.split(b"{", 1)[1].split(b"}", 1)[0].decode()

    def meta(self, job_id: str) -> str:
        return self._tagged(meta_key(job_id))

    def deadline(self, job_id: str) -> str:
        return self._tagged(deadline_key(job_id))

    def watched(self, job_id: str) -> str:
        return self._tagged(watched_key(job_id))

    def tool_catalog(self, worker: str) -> str:
        return self._tagged(tool_catalog_key(worker))

    def aisdk_chat(self, identity: str, chat_id: str) -> str:
        return self._tagged(aisdk_chat_key(identity, chat_id))

    def session(self, session: str) -> str:
        return self._tagged(session_key(session))

    def session_lock(self, session: str) -> str:
        return self._tagged(session_lock_key(session))

    def rate(self, who: str) -> str:
        return self._tagged(rate_key(who))

    def usage(self, identity: str) -> str:
        return self._tagged(usage_key(identity))

    @property
    def place(self) -> str:
        """The shard's place in ``REDIS_URL`` (set by the first process to start on it):
        a shard listed elsewhere would make job ids name the wrong Redis."""
        return f"{self._base}shard"

    def gateway_wake(self, relay: str) -> str:
        """A relay's own stream, to wake its blocking read when a reader joins."""
        return f"{self._base}gateway-wake:{relay}"

    def worker_health(self, worker: str) -> str:
        """arq's health check of one worker (a key per worker: arq's default is one for the
        whole queue)."""
        return f"{self._base}worker-health:{worker}"

    def arq_id(self, job_id: str, attempt: str = "") -> str:
        """An arq id of the job: arq names its keys after it (``arq:job:<id>``), so in a
        Cluster it carries the tag. ``attempt``: a hand-back's suffix."""
        tagged = f"{{{self.tag}}}{job_id}" if self.tag else job_id
        return f"{tagged}.{attempt}" if attempt else tagged
