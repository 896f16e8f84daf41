-- The lease expires: its holder renews `expires_at` (set from this
-- database's clock) well within its time to live, and any process may take
-- over a lease that has expired or was released, incrementing the epoch. No
-- advisory lock is needed any more. A lease row of an earlier version is
-- expired at once.
ALTER TABLE outbox_lease ADD COLUMN expires_at timestamptz NOT NULL DEFAULT now();

-- What the holder commits, in commit order, for standbys to follow: every
-- flush transaction takes the next number from `outbox_feed_head` (a row
-- lock held until it commits, so numbers are dense and in commit order) and
-- names the entities it wrote: `ids`, grouped by kind, the ids of kind
-- `kinds[i]` ending before `kind_ends[i]`. Kept for a while, then pruned; a
-- standby that fell further behind loads everything again.
CREATE TABLE outbox_feed_head (
    name text   PRIMARY KEY,
    seq  bigint NOT NULL
);

CREATE TABLE outbox_feed (
    seq          bigint      PRIMARY KEY,
    epoch        bigint      NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    kinds        text[]      NOT NULL,
    kind_ends    integer[]   NOT NULL,
    ids          text[]      NOT NULL
);
