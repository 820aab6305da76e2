-- A visit's diagnoses (2401/2402/2403/2203 `diseinfo`), kept as sent with the national field names
-- (diag_type, diag_srt_no, diag_code, diag_name, maindiag_flag, diag_dept, dise_dor_no, dise_dor_name,
-- diag_time, vali_flag): 5202 answers them and monitoring rules read them. The engine writes the whole
-- list (a later message with a list replaces it); xs_settle's UPDATE on visit already covers it.

ALTER TABLE visit ADD COLUMN diseinfo jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(diseinfo) = 'array');

-- The stay's particulars a hospital may change with 2403 (doctor, department, bed, descriptions,
-- discharge main diagnosis, operation; schemas.inpatient.ADM_INFO_FIELDS), as sent.
ALTER TABLE visit ADD COLUMN adm_info jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(adm_info) = 'object');
