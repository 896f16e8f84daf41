-- The library's own tables. The kinds' tables are the application's
-- (`outbox::pg::create_table_sql`, `outbox::pg::ensure_tables`, or its own
-- migrations); this history is kept in `outbox_schema_history`, apart from
-- any migrations of the application.

-- Rows the database refused (SQLSTATE classes 22 and 23) or holds in a
-- version this process did not write, quarantined instead of blocking the
-- outbox. A quarantined change set stays whole: its members share one
-- `quarantine_id`, and are written again (or reverted) as one. `cause` marks
-- the member that was refused or in conflict; `base_version` is the version
-- the database held when the set was quarantined, `database_version` the one
-- it held in a conflict. `payload_text` keeps a payload that jsonb itself
-- refuses (e.g. a NUL character). A row stays until an operator replays or
-- discards its set, or a newer version of the entity commits.
CREATE SEQUENCE outbox_quarantine_ids;

CREATE TABLE outbox_dead_letters (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL,
    entity_id        text        NOT NULL,
    version          bigint      NOT NULL,
    payload          jsonb,
    deleted          boolean     NOT NULL DEFAULT false,
    sqlstate         text,
    message          text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 1,
    first_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_failed_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    resolution       text,
    quarantine_id    bigint      NOT NULL,
    reason           text        NOT NULL DEFAULT 'refused' CHECK (reason IN ('refused', 'conflict')),
    cause            boolean     NOT NULL DEFAULT false,
    base_version     bigint,
    database_version bigint,
    payload_text     text
);

-- At most one unresolved dead letter per entity.
CREATE UNIQUE INDEX outbox_dead_letters_unresolved
    ON outbox_dead_letters (kind, entity_id)
    WHERE resolved_at IS NULL;

CREATE INDEX outbox_dead_letters_sets ON outbox_dead_letters (quarantine_id) WHERE resolved_at IS NULL;

-- The single-writer lease, one row per lease name. Every new holder
-- increments `epoch`; every flush transaction checks, under a share lock on
-- this row, that the epoch is still its own, so a process that lost the
-- lease can never commit. The holder renews `expires_at` (this database's
-- clock) well within its time to live; any process may take over a lease
-- that expired or was released.
CREATE TABLE outbox_lease (
    name        text        PRIMARY KEY,
    epoch       bigint      NOT NULL,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL DEFAULT now()
);

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
