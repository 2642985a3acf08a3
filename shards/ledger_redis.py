"""The Redis shard ledger: the ``Ledger`` protocol for clusters (``--ledger redis://...``).

Many drivers on many hosts share one Redis. Every state transition is one Lua script or one
MULTI transaction, so two drivers never hold one shard. Lease expiry is judged by the Redis
server's clock (``TIME`` inside the scripts), never by the caller's: drivers on different
hosts disagree about the time, the server is the one clock they share. The ``now`` argument
of the protocol is therefore ignored by this backend.

Key layout (one run per id, so several runs share one Redis; the braces are a Redis Cluster
hash tag, which keeps one run's keys in one slot as multi-key scripts require):

    distill:{RUN}:meta   hash   num_shards
    distill:{RUN}:done   hash   k -> ShardRecord JSON         (the durable part)
    distill:{RUN}:lease  hash   k -> "<expiry ms, server clock> <owner>"
    distill:{RUN}:hint   string every shard below it is done (a lower bound; 0 if missing)

The password may be in the URL (``redis://:PASSWORD@HOST:PORT/DB``) or, better, in the
``REDISCLI_AUTH`` environment variable with a password-less URL. It is never printed:
``describe()``, errors and logs show the URL through ``distill.storage.redact``.

The shard files stay the truth: a flushed or lost Redis is restored with
``distill ledger rebuild RUN/shards --ledger redis://...``. Redis persistence
(``appendonly yes``) makes that rare, not unnecessary: ``appendfsync everysec`` may lose the
last second of ``complete`` calls, and such shards are simply redone (same bytes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable, Sequence

from distill.errors import BadOption, IncompatibleRun, Unreachable
from distill.shards.format import ShardRecord
from distill.shards.lease import Lease, LedgerState, dead_local_owners
from distill.storage import redact

log = logging.getLogger(__name__)

# A Redis restart (systemd, failover, AOF reload answering LOADING) takes seconds; drivers
# should ride through it rather than abandon hours of work. About 20 s of retries in all.
RETRIES = 12
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 3.0
CONNECT_TIMEOUT_S = 5.0
PASSWORD_ENV = "REDISCLI_AUTH"
SOCKET_TIMEOUT_S = 30.0

# Lowest-first, like shards.ledger.pick_shards: skip done shards and live leases; an expired
# lease (or one held by a dead owner, ARGV[5..]) is pending. The scan starts at the hint and
# moves the hint over the done prefix, so with 6,000 shards a call touches only the live
# frontier, not the finished part.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = ARGV[1]
local n = tonumber(ARGV[2])
local expires = string.format('%d', now + tonumber(ARGV[3]))
local num = tonumber(ARGV[4])
local dead = {}
for i = 5, #ARGV do dead[ARGV[i]] = true end
local k = tonumber(redis.call('GET', KEYS[3]) or '0')
local hint = k
local prefix = true
local out = {}
while k < num and #out < n do
  local ks = tostring(k)
  if redis.call('HEXISTS', KEYS[1], ks) == 1 then
    if prefix then hint = k + 1 end
  else
    prefix = false
    local lease = redis.call('HGET', KEYS[2], ks)
    local live = false
    if lease then
      local sep = string.find(lease, ' ', 1, true)
      local exp = tonumber(string.sub(lease, 1, sep - 1))
      local who = string.sub(lease, sep + 1)
      live = exp > now and not dead[who]
    end
    if not live then
      redis.call('HSET', KEYS[2], ks, expires .. ' ' .. owner)
      table.insert(out, k)
    end
  end
  k = k + 1
end
redis.call('SET', KEYS[3], hint)
return out
"""

# Only the owner's live leases on shards not yet done are extended: an expired lease may
# already be someone else's, and pretending to still hold it would hide that.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = ARGV[1]
local expires = string.format('%d', now + tonumber(ARGV[2]))
local held = {}
for i = 3, #ARGV do
  local ks = ARGV[i]
  local lease = redis.call('HGET', KEYS[2], ks)
  if lease and redis.call('HEXISTS', KEYS[1], ks) == 0 then
    local sep = string.find(lease, ' ', 1, true)
    local exp = tonumber(string.sub(lease, 1, sep - 1))
    if string.sub(lease, sep + 1) == owner and exp > now then
      redis.call('HSET', KEYS[2], ks, expires .. ' ' .. owner)
      table.insert(held, tonumber(ks))
    end
  end
end
return held
"""

_RELEASE = """
local owner = ARGV[1]
for i = 2, #ARGV do
  local lease = redis.call('HGET', KEYS[1], ARGV[i])
  if lease then
    local sep = string.find(lease, ' ', 1, true)
    if string.sub(lease, sep + 1) == owner then redis.call('HDEL', KEYS[1], ARGV[i]) end
  end
end
return 0
"""

_FORGET = """
local hint = tonumber(redis.call('GET', KEYS[2]) or '0')
for i = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  local k = tonumber(ARGV[i])
  if k < hint then hint = k end
end
redis.call('SET', KEYS[2], hint)
return 0
"""


class LedgerUnreachable(Unreachable):
    """Redis could not be reached or refused us."""


def keys(run_id: str) -> dict[str, str]:
    """The Redis keys of one run (see the module docstring)."""
    base = f"distill:{{{run_id}}}"
    return {name: f"{base}:{name}" for name in ("meta", "done", "lease", "hint")}


def parse_lease(k: int, value: str, offset_s: float) -> Lease:
    """A stored lease as a ``Lease`` whose expiry is on the caller's clock (server + offset)."""
    exp_ms, _, owner = value.partition(" ")
    return Lease(k, owner, int(exp_ms) / 1000.0 + offset_s)


class RedisLedger:
    """One run's ledger in Redis. Thread-safe as redis-py clients are; cheap to create."""

    def __init__(self, client, run_id: str, num_shards: int, where: str, password: str | None = None):
        self.num_shards = num_shards
        self.run_id = run_id
        self._r = client
        self._where = where  # already redacted
        self._password = password or None
        self.keys = keys(run_id)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._forget = client.register_script(_FORGET)

    @classmethod
    def from_url(cls, url: str, *, run_id: str, num_shards: int) -> "RedisLedger":
        """Connect, check the server answers, and claim (or check) this run's shard count."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        where = redact(url)
        # A password in the URL ends up in the driver's argv, which `ps` shows and Ray records
        # as the job's entrypoint; REDISCLI_AUTH (redis-cli's own variable) keeps it out.
        env_password = os.environ.get(PASSWORD_ENV) or None
        try:
            client = redis.Redis.from_url(
                url,
                password=env_password,  # the URL's own password, when it has one, wins
                decode_responses=True,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), 0),
            )
        except ValueError as e:
            said = str(e).replace(url, where)
            raise BadOption(f"--ledger {where} is not a valid Redis URL ({said}); use redis://[:PASSWORD@]HOST:PORT/DB") from None
        password = client.connection_pool.connection_kwargs.get("password")
        self = cls(client, run_id, num_shards, where, password)
        # Fail fast at start (no retries: a wrong password or host will not fix itself), then
        # ride through restarts for the rest of the run.
        with self._errors("connect to"):
            client.ping()
            client.hsetnx(self.keys["meta"], "num_shards", num_shards)
            have = int(client.hget(self.keys["meta"], "num_shards"))
        client.set_retry(Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES))
        if have != num_shards:
            raise IncompatibleRun(
                f"Redis ledger {where} holds run {run_id} with {have} shards, not {num_shards}; "
                f"delete its keys (redis-cli --scan --pattern 'distill:{{{run_id}}}:*' | xargs redis-cli del) "
                "or use another Redis database"
            )
        return self

    # -- plumbing
    def _errors(self, doing: str):
        return _RedisErrors(self, doing)

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    # -- interface
    def describe(self) -> str:
        return f"redis ledger {self._where} (run {self.run_id})"

    def __repr__(self) -> str:
        return f"RedisLedger({self._where!r}, run_id={self.run_id!r}, num_shards={self.num_shards})"

    def acquire(self, owner: str, n: int, ttl: float, now: float = 0.0) -> list[int]:
        """Lease up to n shards, lowest first. ``now`` is ignored: Redis's clock decides."""
        if n <= 0:
            return []
        with self._errors("lease shards from"):
            others = {v.partition(" ")[2] for v in self._r.hvals(self.keys["lease"])} - {owner}
            dead = sorted(dead_local_owners(others))
            got = self._acquire(
                keys=[self.keys["done"], self.keys["lease"], self.keys["hint"]],
                args=[owner, n, _ms(ttl), self.num_shards, *dead],
            )
        return [int(k) for k in got]

    def renew(self, owner: str, ks: Sequence[int], ttl: float, now: float = 0.0) -> list[int]:
        if not ks:
            return []
        with self._errors("renew leases in"):
            held = self._renew(keys=[self.keys["done"], self.keys["lease"]], args=[owner, _ms(ttl), *ks])
        return [int(k) for k in held]

    def release(self, owner: str, ks: Sequence[int]) -> None:
        if not ks:
            return
        with self._errors("release leases in"):
            self._release(keys=[self.keys["lease"]], args=[owner, *ks])

    def complete(self, owner: str, record: ShardRecord) -> None:
        # HSETNX: the first record stands; every owner of a shard wrote the same bytes anyway.
        with self._errors("record a done shard in"):
            pipe = self._r.pipeline(transaction=True)
            pipe.hsetnx(self.keys["done"], record.k, json.dumps(record.to_json()))
            pipe.hdel(self.keys["lease"], record.k)
            pipe.execute()

    def snapshot(self) -> LedgerState:
        """Leases come back on the caller's clock, so ``state.counts(time.time())`` is right
        even when this host's clock and Redis's differ."""
        with self._errors("read"):
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(self.keys["lease"])
            pipe.hgetall(self.keys["done"])
            pipe.time()
            raw_leases, raw_done, (sec, usec) = pipe.execute()
        offset = time.time() - (sec + usec / 1e6)
        done = {int(k): ShardRecord.from_json(json.loads(v)) for k, v in raw_done.items()}
        leases = {int(k): parse_lease(int(k), v, offset) for k, v in raw_leases.items() if int(k) not in done}
        return LedgerState(self.num_shards, leases, done)

    def forget(self, ks: Sequence[int]) -> None:
        if not ks:
            return
        with self._errors("forget shards in"):
            self._forget(keys=[self.keys["done"], self.keys["hint"]], args=list(ks))

    def rebuild(self, records: Iterable[ShardRecord]) -> None:
        records = list(records)
        bad = [r.k for r in records if not 0 <= r.k < self.num_shards]
        if bad:
            raise ValueError(f"rebuild got shards {bad[:5]} outside 0..{self.num_shards - 1} for run {self.run_id}")
        with self._errors("rebuild"):
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(self.keys["done"], self.keys["lease"], self.keys["hint"])
            pipe.hset(self.keys["meta"], "num_shards", self.num_shards)
            if records:
                pipe.hset(self.keys["done"], mapping={r.k: json.dumps(r.to_json()) for r in records})
            pipe.execute()

    def close(self) -> None:
        self._r.close()


class _RedisErrors:
    """Turns redis-py connection failures into one message naming the (redacted) URL and
    what to check; scrubs the password out of anything Redis said."""

    def __init__(self, ledger: RedisLedger, doing: str):
        self.ledger, self.doing = ledger, doing

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        import redis

        if exc is None:
            return False
        said = self.ledger._scrub(str(exc)).rstrip(".")
        where = self.ledger._where
        if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in said or "WRONGPASS" in said:
            what = "refused the password" if self.ledger._password else "requires a password"
            raise LedgerUnreachable(
                f"Redis at {where} {what} ({said}); put the server's requirepass in the URL: "
                "redis://:PASSWORD@HOST:PORT/DB"
            ) from None
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            raise LedgerUnreachable(
                f"cannot {self.doing} the Redis ledger at {where}: {said}. Check that redis-server runs "
                "there, that its bind address and firewall admit this host, and the host, port and db in --ledger."
            ) from None
        if isinstance(exc, redis.ResponseError):
            raise LedgerUnreachable(f"the Redis ledger at {where} answered an error: {said}") from None
        return False


def _ms(ttl: float) -> int:
    if ttl <= 0:
        raise ValueError(f"lease ttl must be positive, got {ttl}")
    return max(1, int(round(ttl * 1000)))
