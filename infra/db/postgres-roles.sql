-- genpipe audit DB on PostgreSQL: the application role and append-only event tables.
--
-- Run as the database owner (or a superuser) AFTER `genpipe audit migrate --db URL` (as the owner), in the
-- audit database:   psql "postgresql://owner@host/genpipe_audit" -v ON_ERROR_STOP=1 -1 -f infra/db/postgres-roles.sql
-- (plain SQL, no psql variables: any client can run it).
-- Idempotent: run it again after every migration (new tables get their grants, triggers are replaced).
--
-- genpipe_app is a NOLOGIN group role; give it to the login roles the pipeline and the review page use:
--   CREATE ROLE genpipe_runner LOGIN PASSWORD '...' IN ROLE genpipe_app;
-- What it may do:
--   events                      SELECT, INSERT               (append-only: the audit chain)
--   reviewers                   SELECT, INSERT, UPDATE of password_hash, token_hash, role, disabled
--   jobs, runs, items           SELECT, INSERT, UPDATE       (current state; every change is also an event)
--   leases, review_sessions     SELECT, INSERT, UPDATE, DELETE   (operational state, not history: a job's
--                                                            lease, a signed-in review session)
--   alembic_version,
--   audit_settings              SELECT                       (what migrations record, e.g. where verify starts
--                                                            checking row timestamps: never the app's to move)
-- and never DELETE or TRUNCATE anything else, nor change the schema. On top of that, a trigger rejects UPDATE,
-- DELETE and TRUNCATE of events for every role, the owner included: rewriting history takes disabling the
-- trigger first (a deliberate act of the owner or a superuser), and `genpipe audit verify` catches it anyway.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'genpipe_app') THEN
        CREATE ROLE genpipe_app NOLOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO genpipe_app', current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO genpipe_app;

REVOKE ALL ON events, reviewers, jobs, runs, items, leases, review_sessions, alembic_version, audit_settings
    FROM PUBLIC;
REVOKE ALL ON events, reviewers, jobs, runs, items, leases, review_sessions, alembic_version, audit_settings
    FROM genpipe_app;

GRANT SELECT, INSERT ON events TO genpipe_app;
GRANT SELECT, INSERT ON reviewers TO genpipe_app;
GRANT UPDATE (password_hash, token_hash, role, disabled) ON reviewers TO genpipe_app;
GRANT SELECT, INSERT, UPDATE ON jobs, runs, items TO genpipe_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON leases, review_sessions TO genpipe_app;
GRANT SELECT ON alembic_version, audit_settings TO genpipe_app;
GRANT USAGE ON SEQUENCE runs_id_seq, reviewers_id_seq TO genpipe_app;

CREATE OR REPLACE FUNCTION genpipe_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'genpipe: % on %.% is not allowed: audit events are append-only', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER IF EXISTS events_append_only ON events;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION genpipe_reject_change();
DROP TRIGGER IF EXISTS events_no_truncate ON events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION genpipe_reject_change();
