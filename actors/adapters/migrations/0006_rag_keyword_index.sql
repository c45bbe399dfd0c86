-- The keyword index of RAG collections, in Postgres so that every worker searches the
-- same one (it lived on each worker's disk). An ingest writes a whole generation of a
-- collection's chunks, then points rag_collections at it in the same transaction;
-- searches read only the generation it points at, so a re-ingest appears to every
-- worker at once. Scoring is BM25 over Postgres's own 'english' text search lexemes.
CREATE TABLE IF NOT EXISTS rag_collections (
    collection  text PRIMARY KEY,
    generation  bigint NOT NULL,
    chunks      integer NOT NULL,       -- N of BM25
    avg_length  double precision NOT NULL,  -- average lexemes per chunk
    switched_at timestamptz NOT NULL DEFAULT now()
);

-- One row per chunk and generation: what a search hands the model.
CREATE TABLE IF NOT EXISTS rag_chunks (
    collection text NOT NULL,
    generation bigint NOT NULL,
    n          integer NOT NULL,        -- the chunk's number in its generation
    chunk_id   text NOT NULL,
    vector_id  text NOT NULL,           -- the chunk's vector in Chroma (text-addressed)
    source     text NOT NULL,
    body       text NOT NULL,
    metadata   jsonb NOT NULL,
    length     integer NOT NULL,        -- lexemes, counted with repeats
    PRIMARY KEY (collection, generation, n),
    UNIQUE (collection, generation, chunk_id)
);
CREATE INDEX IF NOT EXISTS rag_chunks_by_vector ON rag_chunks (collection, generation, vector_id);

-- The inverted index: each lexeme's count in each chunk (by number: a search sums
-- thousands of postings, and grouping integers is far cheaper than grouping text).
CREATE TABLE IF NOT EXISTS rag_postings (
    collection text NOT NULL,
    generation bigint NOT NULL,
    lexeme     text NOT NULL,
    n          integer NOT NULL,
    tf         integer NOT NULL,
    length     integer NOT NULL         -- the chunk's, beside each posting for the score
);
CREATE INDEX IF NOT EXISTS rag_postings_by_lexeme ON rag_postings (collection, generation, lexeme);

-- Each lexeme's document frequency in a generation (the IDF of BM25).
CREATE TABLE IF NOT EXISTS rag_terms (
    collection text NOT NULL,
    generation bigint NOT NULL,
    lexeme     text NOT NULL,
    df         integer NOT NULL,
    PRIMARY KEY (collection, generation, lexeme)
);
