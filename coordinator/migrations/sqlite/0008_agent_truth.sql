-- What agents say about their apps beyond healthy or not, and installs that keep failing.

-- The longest the agent lets pass between two verdicts (a verdict older than three of these is
-- stale: 0 means the agent did not say), restarts of the release's app and why it last exited.
ALTER TABLE instance_health ADD COLUMN check_interval_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instance_health ADD COLUMN app_restarts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instance_health ADD COLUMN last_exit TEXT NOT NULL DEFAULT '';
ALTER TABLE instance_health ADD COLUMN last_exit_at BIGINT NOT NULL DEFAULT 0;

-- An instance whose agent keeps failing to install the stack's approved release of a bundle
-- (and retries): since when, and why. Removed once the agent reports that bundle installed.
CREATE TABLE install_failures (
    instance_id  TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    bundle       TEXT NOT NULL,
    version      TEXT NOT NULL,
    reason       TEXT NOT NULL,
    since        BIGINT NOT NULL,
    PRIMARY KEY (instance_id, bundle)
);
