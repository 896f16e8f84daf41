-- The first answers to requests with an `Idempotency-Key`, in the document
-- layout like every kind; expired ones are tombstones.
CREATE TABLE idempotency_keys (
    id         text        PRIMARY KEY,
    version    bigint      NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    data       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);
