-- The reference service's kinds, each in the document layout the engine
-- writes: the entity as jsonb, its version, and a tombstone flag. History in
-- `reference_schema_history`. `IF NOT EXISTS`: databases made before the
-- reference service had a history of its own already hold these tables.

CREATE TABLE IF NOT EXISTS items (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Worth indexing: lookups by status from SQL (reports, repairs).
    status     text GENERATED ALWAYS AS (data->>'status') STORED
);
CREATE INDEX IF NOT EXISTS items_status ON items (status) WHERE NOT deleted;

CREATE TABLE IF NOT EXISTS circuits (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Local ids (LID) of items created locally, mapped to their DFID.
CREATE TABLE IF NOT EXISTS local_ids (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);
