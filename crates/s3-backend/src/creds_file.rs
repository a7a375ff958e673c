//! The AWS shared files (`~/.aws/credentials`, `~/.aws/config`): a profile's keys or its
//! `credential_process`, read from the INI dialect the SDKs write, with errors that name the file
//! and the line, never what it held.

use std::path::Path;

use crate::creds_source::Key;
use crate::error::innermost_detail;

/// Largest shared credentials file read.
const MAX_FILE: u64 = 1 << 20;

/// Which of the AWS shared files a profile is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// `AWS_SHARED_CREDENTIALS_FILE`, `$HOME/.aws/credentials`.
    Credentials,
    /// `AWS_CONFIG_FILE`, `$HOME/.aws/config`.
    Config,
}

impl FileKind {
    fn label(self) -> &'static str {
        match self {
            FileKind::Credentials => "shared credentials file",
            FileKind::Config => "config file",
        }
    }

    fn env(self) -> &'static str {
        match self {
            FileKind::Credentials => "AWS_SHARED_CREDENTIALS_FILE",
            FileKind::Config => "AWS_CONFIG_FILE",
        }
    }
}

/// What a shared file says for a profile.
#[derive(Debug)]
pub(crate) enum FileLookup {
    Found(Key),
    /// The profile's `credential_process` command line.
    Process(String),
    /// No such file; the note says so (for messages).
    Missing(String),
    /// Nothing usable; the note says why (for messages).
    Nothing(String),
}

/// Reads `profile` from the shared credentials file or the config file at `path`.
pub(crate) fn read_profile(path: &Path, profile: &str, kind: FileKind) -> Result<FileLookup, String> {
    let shown = path.display();
    let label = kind.label();
    let fix = format!("fix it, or point {} elsewhere", kind.env());
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(FileLookup::Missing(format!("no {label} at {shown}")))
        }
        Err(e) => return Err(format!("cannot read the {label} {shown}: {}; {fix}", innermost_detail(&e))),
        Ok(m) if !m.is_file() => return Err(format!("the {label} {shown} is not a file; {fix}")),
        Ok(m) if m.len() > MAX_FILE => {
            return Err(format!("the {label} {shown} is larger than {} KiB; {fix}", MAX_FILE >> 10))
        }
        Ok(_) => std::fs::read(path)
            .map_err(|e| format!("cannot read the {label} {shown}: {}; {fix}", innermost_detail(&e)))?,
    };
    let text = String::from_utf8(text).map_err(|_| format!("the {label} {shown} is not UTF-8 text; {fix}"))?;
    let sections = parse_ini(&text).map_err(|e| format!("the {label} {shown} is malformed: {e}; {fix}"))?;
    let Some(keys) = sections.get(&format!("profile {profile}")).or_else(|| sections.get(profile)) else {
        return Ok(FileLookup::Nothing(format!("no profile {profile} in {shown}")));
    };
    let get = |k: &str| {
        keys.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
    };
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key), Some(secret_key)) => {
            Ok(FileLookup::Found(Key { access_key, secret_key, session_token: get("aws_session_token") }))
        }
        (None, None) => match get("credential_process") {
            Some(command) => Ok(FileLookup::Process(command)),
            None => Ok(FileLookup::Nothing(format!(
                "profile {profile} in {shown} has no aws_access_key_id or credential_process (sso and role_arn are not supported)"
            ))),
        },
        (Some(_), None) => Err(format!(
            "profile {profile} in the {label} {shown} has aws_access_key_id but no aws_secret_access_key; add it"
        )),
        (None, Some(_)) => Err(format!(
            "profile {profile} in the {label} {shown} has aws_secret_access_key but no aws_access_key_id; add it"
        )),
    }
}

/// An INI file's sections, each a list of `key = value` in file order. Sections that appear
/// twice are merged.
type Sections = std::collections::HashMap<String, Vec<(String, String)>>;

/// Parses the INI dialect of the AWS shared files: `[section]` headers, `key = value` (or
/// `key: value`), comment lines starting with `#` or `;`, blank lines. Values are taken as they
/// are (no inline comments, as botocore reads them); indented lines are nested settings of the
/// config file and kept as keys of their section. Errors name the line, never its content.
fn parse_ini(text: &str) -> Result<Sections, String> {
    let mut sections = Sections::new();
    let mut current: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(format!("line {n} opens a [section] that is not closed"));
            };
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            if name.is_empty() {
                return Err(format!("line {n} is a section without a name"));
            }
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(at) = line.find(['=', ':']) else {
            return Err(format!("line {n} is neither a [section] nor key = value"));
        };
        let (key, value) = (line[..at].trim(), line[at + 1..].trim());
        if key.is_empty() {
            return Err(format!("line {n} has a value without a key"));
        }
        let Some(section) = &current else {
            return Err(format!("line {n} sets a key before any [section]"));
        };
        sections.entry(section.clone()).or_default().push((key.to_string(), value.to_string()));
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds_source::tests::file;

    #[test]
    fn ini_sections_keys_and_comments() {
        let text = "# comment\n; also\n[default]\naws_access_key_id = AKIA1\naws_secret_access_key=s3cr3t/+=\n\n[profile backup]\n  aws_access_key_id : AKIA2 \n[ spaced   name ]\nk=v=w\n[default]\naws_session_token = tok\n";
        let s = parse_ini(text).unwrap();
        assert_eq!(
            s["default"],
            vec![
                ("aws_access_key_id".to_string(), "AKIA1".to_string()),
                ("aws_secret_access_key".to_string(), "s3cr3t/+=".to_string()),
                ("aws_session_token".to_string(), "tok".to_string()),
            ]
        );
        assert_eq!(s["profile backup"], vec![("aws_access_key_id".to_string(), "AKIA2".to_string())]);
        assert_eq!(s["spaced name"], vec![("k".to_string(), "v=w".to_string())]);
    }

    #[test]
    fn malformed_ini_names_the_line_and_never_the_content() {
        for (text, want) in [
            ("[default\naws_secret_access_key = hidden-value", "line 1 opens a [section]"),
            ("aws_secret_access_key = hidden-value", "line 1 sets a key before any [section]"),
            ("[default]\nhidden-value", "line 2 is neither"),
            ("[default]\n= hidden-value", "line 2 has a value without a key"),
            ("[]\n", "line 1 is a section without a name"),
        ] {
            let e = parse_ini(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("hidden-value"), "{e}");
        }
    }

    #[test]
    fn profiles_are_found_by_name_or_as_profile_name() {
        let f = file("[default]\naws_access_key_id=A\naws_secret_access_key=S\n[profile other]\nAWS_ACCESS_KEY_ID=B\naws_secret_access_key=T\naws_session_token=X\n[roles]\nrole_arn=arn\n");
        let FileLookup::Found(k) = read_profile(f.path(), "default", FileKind::Credentials).unwrap() else { panic!() };
        assert_eq!(k, Key { access_key: "A".into(), secret_key: "S".into(), session_token: None });
        let FileLookup::Found(k) = read_profile(f.path(), "other", FileKind::Credentials).unwrap() else { panic!() };
        assert_eq!(k, Key { access_key: "B".into(), secret_key: "T".into(), session_token: Some("X".into()) });
        let FileLookup::Nothing(n) = read_profile(f.path(), "missing", FileKind::Credentials).unwrap() else {
            panic!()
        };
        assert!(n.starts_with("no profile missing in"), "{n}");
        let FileLookup::Nothing(n) = read_profile(f.path(), "roles", FileKind::Credentials).unwrap() else { panic!() };
        assert!(n.contains("has no aws_access_key_id or credential_process"), "{n}");
        let FileLookup::Missing(n) =
            read_profile(&f.path().with_extension("absent"), "default", FileKind::Credentials).unwrap()
        else {
            panic!()
        };
        assert!(n.starts_with("no shared credentials file at"), "{n}");
    }

    #[test]
    fn half_a_key_and_broken_files_are_errors_naming_the_file() {
        let f = file("[default]\naws_access_key_id=A\n");
        let e = read_profile(f.path(), "default", FileKind::Credentials).unwrap_err();
        assert!(e.contains(&f.path().display().to_string()) && e.contains("no aws_secret_access_key"), "{e}");
        let f = file("[default]\naws_secret_access_key = hidden-value\nbroken line hidden-value\n");
        let e = read_profile(f.path(), "default", FileKind::Credentials).unwrap_err();
        assert!(e.contains(&f.path().display().to_string()) && e.contains("line 3"), "{e}");
        assert!(!e.contains("hidden-value"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_profile(dir.path(), "default", FileKind::Credentials).unwrap_err();
        assert!(e.contains("is not a file"), "{e}");
        let f = file("");
        std::fs::write(f.path(), b"[default]\n\xff\xfe\n").unwrap();
        assert!(read_profile(f.path(), "default", FileKind::Credentials).unwrap_err().contains("not UTF-8"));
    }
}
