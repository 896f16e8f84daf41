-- One table per entity kind of the reference service, all of the layout the
-- engine writes: the entity as jsonb, its
-- version, and a tombstone flag.

CREATE TABLE items (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Worth indexing: lookups by status from SQL (reports, repairs).
    status     text GENERATED ALWAYS AS (data->>'status') STORED
);
CREATE INDEX items_status ON items (status) WHERE NOT deleted;

CREATE TABLE circuits (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Local ids (LID) of items created locally, mapped to their DFID.
CREATE TABLE local_ids (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);
