-- Traffic control: each stack's load-balancer provider (and, where a layer
-- has its own, that layer's), as JSON (`traffic::TrafficSettings`). Layer ''
-- is the stack's default.

CREATE TABLE traffic_settings (
    stack       TEXT NOT NULL REFERENCES stacks (name),
    layer       TEXT NOT NULL DEFAULT '',
    settings    TEXT NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (stack, layer)
);
