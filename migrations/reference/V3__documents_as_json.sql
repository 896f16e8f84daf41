-- The documents as json rather than jsonb: the engine writes each entity
-- whole and reads it back whole (hydration), never by key, and json keeps
-- the text as written where jsonb parses it on every write and prints it
-- again on every read (most of the database's work per row). `->>` and
-- the other accessors work on json too; a generated column keeps what is
-- worth indexing.
--
-- Each table is rewritten once, under an exclusive lock. A generated
-- column cannot outlive a change of the type it reads, so `items.status`
-- is made again in the same statement, and its index after it.
ALTER TABLE items
    DROP COLUMN IF EXISTS status,
    ALTER COLUMN data TYPE json USING data::json,
    ADD COLUMN status text GENERATED ALWAYS AS (data->>'status') STORED;
CREATE INDEX items_status ON items (status) WHERE NOT deleted;

ALTER TABLE circuits ALTER COLUMN data TYPE json USING data::json;
ALTER TABLE local_ids ALTER COLUMN data TYPE json USING data::json;
ALTER TABLE idempotency_keys ALTER COLUMN data TYPE json USING data::json;
