"""Subscriptions' event log (Redis): the event numbers seen, the catch-ups owed (see ``EventLog``)."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from .subscriptions import Event, Notification

log = logging.getLogger(__name__)


@dataclass
class Gap:
    missed: int                    # events numbered but never sent, or sent without saying what changed
    since: datetime                # catch up on Observations changed from here on
    claim: str = ""                # the token of this notification's claim on it (``settle`` checks it)
    mark: str = ""                 # gap_since as it was claimed (``settle`` moves it only if it still is)


# One notification, recorded atomically (two at once must not both see a gap, nor lose an advance).
# KEYS[1]: the subscription's hash, KEYS[2]: its owed event numbers (see _OWE). ARGV: now, lease
# (seconds), a heartbeat's count ('' if none), 1 if an event carries neither a number nor a focus (or
# it could not be read), the earliest time an event without its focus happened ('' if none said), a
# token for a claim, when its latest event happened ('' if none said), the clocks' margin (seconds),
# the events' reorder tolerance (seconds), then pairs: an event number, 1 if its focus came (an id-only
# focus: and could be read).
# The hash: number (highest seen) and at (when), stamp (when the notification that last moved the number
# said its events happened; none if it did not say),
# gap_since/gap_missed (a catch-up owed), gap_claim (until when one notification is running it) and
# gap_holder (its token).
# Returns {at before this notification ('' if none), '1' if its numbers restarted ('' if not)}, plus
# {gap_missed, gap_since} if this one is to run the catch-up. Nothing is written before the last
# command that can fail (HINCRBY): a script is not rolled back.
_RECORD = """
local key, now = KEYS[1], tonumber(ARGV[1])
local previous = redis.call('HGET', key, 'at') or ''
local last, count = tonumber(redis.call('HGET', key, 'number')), tonumber(ARGV[3])
local stamp, happened = tonumber(redis.call('HGET', key, 'stamp')), tonumber(ARGV[7])
-- Numbers that restarted without a handshake: none above the last one seen, but an event that happened
-- after the last number's event (more than the reorder tolerance: events numbered close together may
-- say they happened in another order; the same clock, the hospital's). A repeat or late delivery
-- cannot: its event happened before the last number seen was sent. If the last number's event said
-- nothing of when, compared with when the log last moved: our clock, hence the clocks' margin.
local restarted = false
if last ~= nil and happened ~= nil and #ARGV >= 10 then
  local top, seen, slack = nil, stamp, tonumber(ARGV[9])
  if seen == nil then seen, slack = tonumber(previous), tonumber(ARGV[8]) end
  for i = 10, #ARGV, 2 do
    if top == nil or tonumber(ARGV[i]) > top then top = tonumber(ARGV[i]) end
  end
  if seen ~= nil and top <= last and happened > seen + slack then restarted, last = true, nil end
end
local highest, numbered, focused = count, {}, {}
local numbers, arrived = 0, 0
for i = 10, #ARGV, 2 do
  local n = tonumber(ARGV[i])
  if highest == nil or n > highest then highest = n end
  if last == nil or n > last then
    if not numbered[n] then numbered[n] = true; numbers = numbers + 1 end
    if ARGV[i + 1] == '1' and not focused[n] then focused[n] = true; arrived = arrived + 1 end
  end
end
local missed = 0
if restarted then
  missed = math.max(highest - arrived, 1)    -- the new numbers before these, and whatever came in between
elseif last == nil then
  missed = numbers - arrived                 -- first notification seen: only its empty events
elseif highest ~= nil and highest > last then
  missed = highest - last - arrived          -- every number above the last one that did not come
end
if ARGV[4] == '1' and missed == 0 then missed = 1 end
if missed > 0 then
  local at = previous ~= '' and previous or ARGV[1]   -- the window opens when the log last moved,
  if ARGV[5] ~= '' and tonumber(ARGV[5]) < tonumber(at) then at = ARGV[5] end   -- or when the event happened
  local since = tonumber(redis.call('HGET', key, 'gap_since'))
  redis.call('HINCRBY', key, 'gap_missed', missed)
  if since == nil or tonumber(at) < since then redis.call('HSET', key, 'gap_since', at) end
end
if restarted then redis.call('DEL', KEYS[2]) end     -- the new numbering reuses the numbers owed
if highest ~= nil and (last == nil or highest > last or (highest == last and count ~= nil)) then
  redis.call('HSET', key, 'number', highest, 'at', ARGV[1])
  -- The time of the events that moved the number, replaced (not the latest ever said: one event
  -- dated in the future by a bad clock would hide every restart after it); only with the number (old
  -- numbers must not move it). A heartbeat that matches our number moves nothing of it.
  if happened ~= nil then redis.call('HSET', key, 'stamp', ARGV[7])
  elseif last == nil or highest > last then redis.call('HDEL', key, 'stamp') end
end
local flag = restarted and '1' or ''
local since = redis.call('HGET', key, 'gap_since')
local claim = tonumber(redis.call('HGET', key, 'gap_claim'))
if not since or (claim ~= nil and claim > now) then return {previous, flag} end
redis.call('HSET', key, 'gap_claim', tostring(now + tonumber(ARGV[2])), 'gap_holder', ARGV[6])
return {previous, flag, redis.call('HGET', key, 'gap_missed'), since}
"""

# KEYS[1]: the subscription's hash, KEYS[2]: its owed event numbers (see _OWE). ARGV: the gap's count,
# 1 if its catch-up is done (0: try again), the claim's token, where a catch-up that read part of its
# window continues ('' if none), and gap_since as it was claimed: moved only if no notification opened
# the window earlier meanwhile. Only the claim's holder settles: one whose lease lapsed (another runs
# the catch-up now) changes nothing. Returns 1 if settled.
_SETTLE = """
if redis.call('HGET', KEYS[1], 'gap_holder') ~= ARGV[3] then return 0 end
if ARGV[2] == '1' then
  if redis.call('HINCRBY', KEYS[1], 'gap_missed', -tonumber(ARGV[1])) <= 0 then
    redis.call('HDEL', KEYS[1], 'gap_since', 'gap_missed')
    redis.call('DEL', KEYS[2])
  end
elseif ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'gap_since') == ARGV[5] then
  redis.call('HSET', KEYS[1], 'gap_since', ARGV[4])
end
redis.call('HDEL', KEYS[1], 'gap_claim', 'gap_holder')
return 1
"""

# KEYS[1]: the subscription's hash, KEYS[2]: the event numbers owed while this catch-up is (a set: the
# same notification failing again is not counted again). ARGV: a count of events without a number,
# since when (a timestamp), then the event numbers: a catch-up owed.
_OWE = """
local since = tonumber(redis.call('HGET', KEYS[1], 'gap_since'))
local count, counted = tonumber(ARGV[1]), {}
for i = 3, #ARGV do
  if not counted[ARGV[i]] and redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then count = count + 1 end
  counted[ARGV[i]] = true
end
redis.call('HINCRBY', KEYS[1], 'gap_missed', count)
for i = 3, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
if since == nil or tonumber(ARGV[2]) < since then redis.call('HSET', KEYS[1], 'gap_since', ARGV[2]) end
"""


class EventLog:
    """Per subscription, the highest event number seen and when (Redis): finds missed notifications.

    The backport numbers every event of a subscription (each event's ``event-number``; older servers
    send only ``events-since-subscription-start``, which counts this notification's events too). The
    numbers above the highest one seen that a notification does not carry (up to its highest, or up
    to a heartbeat's count) were lost: a notification the hospital's server gave up on, an outage
    here. An event sent without its focus (an ``empty`` payload) says something changed without
    saying what: it counts as missed too, and so does an id-only event whose focus could not be read
    from the hospital's server for now (``unread``). Any of them starts a catch-up search, for
    Observations changed since the log last moved (less ``MARGIN``), or since such an event happened
    if it says so and that is earlier (``OPENING``).

    What the rule guarantees: recording is one Lua script, so notifications at the same time are
    taken one after the other; the highest number never moves back, so each number is counted
    missing at most once, and never once it has arrived. A number arriving after a higher one (7
    before 6) was missing when 7 came: that one catch-up runs (a search; the debounce keeps it from
    rescoring anyone twice), and 6 is then an old number, no gap. A late or repeated delivery moves
    nothing (refreshing the time would move the next catch-up window past events lost meanwhile).
    The time moves with the number, or with a heartbeat whose count matches ours (nothing came since).
    One exception to "old numbers are old news": a notification whose numbers are none above the last
    one seen but whose event happened more than ``REORDER`` after the last number's event (its
    ``timestamp``, compared with the one said by the notification that last moved the number - replaced
    each time, so one date from a bad clock is forgotten with the next number - both the hospital's
    clock; or, if that said none, more than ``MARGIN`` after the log last moved, our clock) is no
    repeat - a repeat happened before the last number was sent - but numbering that restarted without
    a handshake (the subscription re-created): the numbers start again from it, and a catch-up is owed
    from when the log last moved. A restart is therefore told with the first of its events dated more
    than ``REORDER`` after the last one seen (the events before it are queued, as any are, and the
    catch-up covers any lost). What it cannot tell: a restart whose new numbers pass the last one seen
    within ``REORDER`` (or ``MARGIN``) of it, or whose events say no time: the new numbers then look
    like the old ones going on, and one lost among those under the last number is not caught up (once
    past it, a gap is seen as any is). A late delivery dated more than ``REORDER`` after a later
    number's event (or a repeat whose timestamp the server renews) is taken as a restart: a catch-up
    and the numbering taken up from it - a search and some rescorings twice, nothing lost.
    The scripts write nothing before their last command that can fail, so a failure leaves no half.

    A catch-up owed is kept (``gap_since``, ``gap_missed``) until one succeeds: the notification
    that runs it claims it for ``LEASE`` (others go on without it), then settles it; if the search
    failed or that process died, the next notification runs it. A claim carries a token: once its
    lease lapsed and another notification took it over, the first one's settle changes nothing. A
    catch-up that read as many pages as it may (``catch_up``) moves the window's start to where it
    stopped, once its patients are queued, unless a notification opened the window earlier meanwhile;
    the next notification continues from there.

    Recording comes before queuing (so that two notifications never both see a gap), so a
    notification is counted as received even if its patients then could not be queued: ``handle``
    then settles its catch-up as not done and ``owe``s its events (a catch-up from when the log
    last moved before it), so that nothing is lost whether the hospital's server sends it again or
    gives up on it. An event number owed is owed once until the catch-up is settled (the same
    notification failing twice is one event owed, not two). ``gap_missed`` is still a count for the
    logs, not an exact one: a number counted missing and then delivered late and not queued counts twice.
    """

    MARGIN = timedelta(minutes=5)    # clock skew between the hospital's server and us
    # Events numbered close together may say they happened in another order (numbered and dated at
    # slightly different moments): an old number whose event happened no more than this after the last
    # number's is a late delivery, not a restart. A restart told wrongly costs a catch-up; one not told,
    # the events lost in the new numbering under the last number: hence small.
    REORDER = timedelta(seconds=30)
    # An event without its focus (empty, or unread) that says when it happened opens the window then,
    # if that is earlier (a delivery that came late), but never more than this before it came: a clock
    # far off must not make the catch-up a search of days (continued CATCH_UP_PAGES pages at a time).
    OPENING = timedelta(hours=1)
    # Longer than a catch-up search usually takes (20 pages, each tried twice, 10 s timeouts: 400 s; one
    # reading on over changes at one instant, up to 50 pages, may take longer); if it lapses, a second
    # search runs: a duplicate, not a loss.
    LEASE = timedelta(minutes=10)

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._record = client.register_script(_RECORD)
        self._settle = client.register_script(_SETTLE)
        self._owe = client.register_script(_OWE)

    def _key(self, subscription: str) -> str:
        return f"{self.prefix}{subscription}"

    def _keys(self, subscription: str) -> list[str]:
        """The subscription's hash, and the set of its event numbers owed (``owe``)."""
        return [self._key(subscription), f"{self._key(subscription)}:owed"]

    def record(self, notification: Notification, now: datetime, unread: Iterable[int] = ()) -> Gap | None:
        """Advance the log past this notification; the catch-up it is to run (None: none owed, or
        another notification is running it). ``settle`` it afterwards. ``unread``: the positions of
        its events whose focus could not be read (counted as missed)."""
        return self.enter(notification, now, unread)[0]

    def enter(self, notification: Notification, now: datetime,
              unread: Iterable[int] = ()) -> tuple[Gap | None, datetime | None, bool]:
        """``record``, when the log last moved before this notification (None: never), from where to
        ``owe`` its events if they cannot be queued, and whether its numbers restarted without a
        handshake (its numbers are none above the last one seen, but it happened well after the events
        seen: the subscription was re-created; a catch-up from when the log last moved is owed)."""
        skipped = set(unread)
        numbers, count, unknown = _accounting(notification, skipped)
        opened = self.opening([e for i, e in enumerate(notification.events) if e.focus is None or i in skipped],
                              now)
        happened = max((e.timestamp for e in notification.events if e.timestamp is not None), default=None)
        token = uuid.uuid4().hex
        args: list[Any] = [repr(now.timestamp()), self.LEASE.total_seconds(),
                           "" if count is None else count, int(unknown),
                           "" if opened is None else repr(opened.timestamp()), token,
                           "" if happened is None else repr(happened.timestamp()), self.MARGIN.total_seconds(),
                           self.REORDER.total_seconds()]
        for number, focused in numbers:
            args += [number, int(focused)]
        found = self._record(keys=self._keys(notification.subscription), args=args)
        previous = datetime.fromtimestamp(float(found[0]), timezone.utc) if found[0] else None
        restarted = bool(found[1])
        if restarted:
            log.warning("Subscription/%s: event numbers restarted without a handshake (event %d is no higher than "
                        "the last one seen, but happened after the last one seen's event): taken as the subscription "
                        "re-created at the hospital's server; numbered from here, and a catch-up is owed from "
                        "when the subscription was last seen", notification.subscription,
                        max(n for n, _ in numbers))
        if len(found) < 4:
            return None, previous, restarted
        return (Gap(int(found[2]), datetime.fromtimestamp(float(found[3]), timezone.utc) - self.MARGIN,
                    token, _text(found[3])), previous, restarted)

    @classmethod
    def opening(cls, events: Iterable[Event], now: datetime) -> datetime | None:
        """When the earliest of ``events`` happened (its ``timestamp``), at most ``OPENING`` before ``now``;
        None if none says."""
        happened = [e.timestamp for e in events if e.timestamp is not None]
        return max(min(happened), now - cls.OPENING) if happened else None

    def settle(self, subscription: str, gap: Gap, done: bool, resume: datetime | None = None) -> None:
        """The catch-up for ``gap`` ran (``done``), or failed for now: the next notification runs it,
        from ``resume`` if given (this one read every Observation changed before it: the hospital's
        clock, so without ``MARGIN``). Nothing happens if this claim lapsed and another notification
        holds it now."""
        moved = "" if done or resume is None else repr((resume + self.MARGIN).timestamp())
        if not self._settle(keys=self._keys(subscription), args=[gap.missed, int(done), gap.claim, moved, gap.mark]):
            log.warning("Subscription/%s: a catch-up claim lapsed before it was settled (another notification "
                        "runs it)", subscription)

    def owe(self, notification: Notification, since: datetime) -> None:
        """A catch-up of ``notification``'s events is owed, for Observations changed from ``since`` (less
        ``MARGIN``). Its numbered events are counted once while the catch-up is owed: the hospital's
        server sending it again, failing again, owes nothing more."""
        numbers, _, _ = _accounting(notification, set())
        unnumbered = len(notification.events) - len(numbers)
        self._owe(keys=self._keys(notification.subscription),
                  args=[unnumbered, repr(since.timestamp()), *(number for number, _ in numbers)])

    def restart(self, notification: Notification, now: datetime) -> None:
        """A handshake: the subscription starts (again), its numbering with it. A catch-up owed stays owed
        (its numbers, which the new numbering reuses for other events, no longer tell a repeat)."""
        count = whole_number(notification.events_since_start)
        key, owed = self._keys(notification.subscription)
        with self.client.pipeline() as pipe:
            pipe.hdel(key, "number", "at", "stamp")
            pipe.delete(owed)
            if count is not None:
                pipe.hset(key, mapping={"number": count, "at": repr(now.timestamp())})
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _accounting(notification: Notification, unread: set[int]) -> tuple[list[tuple[int, bool]], int | None, bool]:
    """(event number, focus sent and read) for each event; a heartbeat's count; True if an event has
    neither a number nor a focus read."""
    count = whole_number(notification.events_since_start)
    if notification.type != "event-notification":
        return [], count, False
    events = notification.events
    if not events:    # an event-notification has one at least: one without a number nor a focus
        return ([(count, False)], None, False) if count is not None else ([], None, True)
    came = [e.focus is not None and i not in unread for i, e in enumerate(events)]
    numbers = [whole_number(e.number) for e in events]
    if None in numbers:
        if count is None:
            return [], None, not all(came)
        # No event-number (older servers): the count includes this notification's events, which are
        # therefore the last len(events) numbers up to it.
        numbers = list(range(count - len(events) + 1, count + 1))
    return list(zip(numbers, came)), None, False


def whole_number(value: str | None) -> int | None:
    """An event number or count as a number; None if absent or not a whole number."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
