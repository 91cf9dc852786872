-- Rolling deployments: the approved release per stack and bundle (with its
-- history, so `rollwave rollback` knows the previous one), deliberate
-- exceptions (pins), the desired state last sent to each instance, the epoch
-- counter that orders those pushes, and the latest health per instance.

CREATE TABLE approvals (
    sequence       INTEGER PRIMARY KEY AUTOINCREMENT,
    stack          TEXT NOT NULL REFERENCES stacks (name),
    bundle         TEXT NOT NULL,
    version        TEXT NOT NULL,
    deployment_id  TEXT NOT NULL DEFAULT '',
    approved_at    BIGINT NOT NULL,
    FOREIGN KEY (bundle, version) REFERENCES releases (bundle, version)
);
CREATE INDEX approvals_by_stack ON approvals (stack, bundle, sequence);

CREATE TABLE pins (
    instance_id  TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    bundle       TEXT NOT NULL,
    version      TEXT NOT NULL,
    pinned_by    TEXT NOT NULL,
    pinned_at    BIGINT NOT NULL,
    PRIMARY KEY (instance_id, bundle),
    FOREIGN KEY (bundle, version) REFERENCES releases (bundle, version)
);

CREATE TABLE desired_states (
    instance_id  TEXT PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    epoch        BIGINT NOT NULL,
    body         TEXT NOT NULL                    -- JSON: deployment id, active and prepare releases
);

CREATE TABLE counters (
    name   TEXT PRIMARY KEY,
    value  BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('epoch', 0);

CREATE TABLE instance_health (
    instance_id  TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    bundle       TEXT NOT NULL,
    version      TEXT NOT NULL,
    healthy      BOOLEAN NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    since        BIGINT NOT NULL,                 -- when it last changed
    observed_at  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, bundle)
);

CREATE INDEX deployments_by_stack ON deployments (stack, bundle, created_at);
-- running | succeeded | failed | aborted: lets a restarted coordinator find
-- the deployments to resume without parsing every state.
ALTER TABLE deployments ADD COLUMN status TEXT NOT NULL DEFAULT 'running';
