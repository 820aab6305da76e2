-- Retention prunes corrections with the stored answers' cutoff (deploy.ops retention), in chunks along this.
CREATE INDEX correction_at ON correction (corrected_at);
