-- The single-writer lease. One row per lease name. Every
-- new holder increments `epoch`; every flush transaction checks, under a
-- share lock on this row, that the epoch is still its own, so a process that
-- lost the lease can never commit. The advisory lock taken alongside is only
-- how a second process waits its turn.
CREATE TABLE outbox_lease (
    name        text        PRIMARY KEY,
    epoch       bigint      NOT NULL,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
