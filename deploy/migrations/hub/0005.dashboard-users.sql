-- depends: 0004.trust
-- Dashboard sign-in (README "Security" → "Dashboard sign-in"): the clearing staff's accounts.
-- The password is stored as an scrypt hash with its parameters (services/dashboard/auth.py); a disabled
-- user cannot sign in and loses the sessions they have. Changes are made by
-- `python -m services.dashboard.users` (audited) and, once, by the dashboard creating `admin`.
CREATE TABLE dashboard_user (
    username       text        PRIMARY KEY CHECK (username ~ '^[a-z0-9._-]{1,32}$'),
    role           text        NOT NULL CHECK (role IN ('viewer', 'operator')),
    password_hash  text        NOT NULL CHECK (password_hash LIKE 'scrypt$%'),
    disabled       boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
