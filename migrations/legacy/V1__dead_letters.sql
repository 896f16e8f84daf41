-- Records that can never be written (SQLSTATE classes 22 and 23) are
-- quarantined here instead of blocking the outbox. A row stays
-- until an operator replays or discards it, or until a newer version of the
-- same entity commits (then `resolved_at` is set).
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
    resolution       text
);

-- At most one unresolved dead letter per entity: a newer failing version
-- updates it instead of piling up rows.
CREATE UNIQUE INDEX outbox_dead_letters_unresolved
    ON outbox_dead_letters (kind, entity_id)
    WHERE resolved_at IS NULL;
