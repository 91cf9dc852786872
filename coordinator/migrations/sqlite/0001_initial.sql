-- The first schema: everything the foundation stores, and the tables the
-- release and deployment work will fill. Timestamps are unix milliseconds
-- (BIGINT) so the same queries run on SQLite and PostgreSQL.

CREATE TABLE stacks (
    name        TEXT PRIMARY KEY,
    stage       TEXT NOT NULL CHECK (stage IN ('dev', 'staging', 'production')),
    created_at  BIGINT NOT NULL
);

CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    stack          TEXT NOT NULL REFERENCES stacks (name),
    hostname       TEXT NOT NULL DEFAULT '',
    layer          TEXT NOT NULL DEFAULT '',
    zone           TEXT NOT NULL DEFAULT '',
    tags           TEXT NOT NULL DEFAULT '{}',  -- JSON object
    agent_version  TEXT NOT NULL DEFAULT '',
    joined_at      BIGINT NOT NULL,
    last_seen      BIGINT NOT NULL,
    observed       TEXT NOT NULL DEFAULT '[]'   -- JSON list of observed releases
);
CREATE INDEX instances_by_stack ON instances (stack);

-- Client certificates issued to instances. A certificate identifies an
-- instance only while its row exists: removing the instance removes them.
CREATE TABLE certificates (
    fingerprint  TEXT PRIMARY KEY,               -- sha256 of the DER, hex
    instance_id  TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    issued_at    BIGINT NOT NULL,
    not_after    BIGINT NOT NULL
);
CREATE INDEX certificates_by_instance ON certificates (instance_id);

CREATE TABLE join_tokens (
    id             TEXT PRIMARY KEY,
    stack          TEXT NOT NULL REFERENCES stacks (name),
    secret_sha256  TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    uses_total     INTEGER NOT NULL,
    uses_left      INTEGER NOT NULL CHECK (uses_left >= 0),
    revoked        BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    token_sha256  TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL
);

CREATE TABLE bundles (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('app', 'cookbook')),
    created_at  BIGINT NOT NULL
);

CREATE TABLE releases (
    bundle          TEXT NOT NULL REFERENCES bundles (name),
    version         TEXT NOT NULL,
    bucket          TEXT NOT NULL,
    object_key      TEXT NOT NULL,
    object_version  TEXT,                        -- NULL only for --allow-unversioned
    sha256          TEXT NOT NULL,
    size            BIGINT NOT NULL,
    pushed_by       TEXT NOT NULL,
    pushed_at       BIGINT NOT NULL,
    PRIMARY KEY (bundle, version)
);

CREATE TABLE deployments (
    id          TEXT PRIMARY KEY,
    stack       TEXT NOT NULL REFERENCES stacks (name),
    bundle      TEXT NOT NULL,
    version     TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    state       TEXT NOT NULL,                   -- serialized rollout state
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    FOREIGN KEY (bundle, version) REFERENCES releases (bundle, version)
);

-- The audit trail: who did what, to what, when, and how it ended.
CREATE TABLE events (
    sequence  INTEGER PRIMARY KEY AUTOINCREMENT,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL DEFAULT ''
);
