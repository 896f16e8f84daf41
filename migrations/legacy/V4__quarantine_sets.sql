-- A quarantined change set stays whole: the dead letters of its members
-- share one quarantine id, and the set is written again (or reverted) as
-- one. A dead letter is either a row the database refused ('refused') or a
-- row the database holds in a version this process did not write
-- ('conflict'); `cause` marks the member that was refused or in conflict.
-- `base_version` is the version the database held when the set was
-- quarantined, `database_version` the one it held in a conflict.
-- `payload_text` keeps a payload that jsonb itself refuses (e.g. a NUL
-- character), so that no dead letter is ever kept without its payload.
CREATE SEQUENCE outbox_quarantine_ids;

ALTER TABLE outbox_dead_letters
    ADD COLUMN quarantine_id    bigint,
    ADD COLUMN reason           text    NOT NULL DEFAULT 'refused' CHECK (reason IN ('refused', 'conflict')),
    ADD COLUMN cause            boolean NOT NULL DEFAULT false,
    ADD COLUMN base_version     bigint,
    ADD COLUMN database_version bigint,
    ADD COLUMN payload_text     text;

-- Dead letters written before sets existed: each is a set of its own.
UPDATE outbox_dead_letters SET quarantine_id = nextval('outbox_quarantine_ids'), cause = true
    WHERE quarantine_id IS NULL;
ALTER TABLE outbox_dead_letters ALTER COLUMN quarantine_id SET NOT NULL;

CREATE INDEX outbox_dead_letters_sets ON outbox_dead_letters (quarantine_id) WHERE resolved_at IS NULL;
