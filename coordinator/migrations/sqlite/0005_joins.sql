-- Joins that committed, by the request id the agent generates once per join
-- and keeps across retries: a join whose reply was lost gets the same answer
-- (instance and certificate) when the agent asks again, without spending
-- another use of its token. Removing the instance forgets its joins.
CREATE TABLE joins (
    request_id         TEXT PRIMARY KEY,
    public_key_sha256  TEXT NOT NULL,             -- sha256 of the CSR's public key, hex
    token_id           TEXT NOT NULL,
    instance_id        TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    certificate_pem    TEXT NOT NULL,
    not_after          BIGINT NOT NULL,
    joined_at          BIGINT NOT NULL
);
CREATE INDEX joins_by_instance ON joins (instance_id);
