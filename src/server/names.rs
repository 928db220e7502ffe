//! A request's id and the names of its objects in the store: what the server files an upload
//! and its prediction under, and how `GET /predictions/<id>` finds them again from the id alone.

use std::time::SystemTime;

use crate::storage::random_hex;

/// A request's id: its UTC date and 128 random bits, `YYYYMMDD-<32 hex digits>`. The date
/// tells where the request's objects live, so a prediction is found from its id alone; the
/// random part keeps ids unguessable.
pub fn new_request_id(now: SystemTime) -> String {
    let date = time::OffsetDateTime::from(now);
    format!(
        "{:04}{:02}{:02}-{}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        random_hex::<16>()
    )
}

/// The `YYYY/MM/DD` directory of a well-formed request id; `None` for anything else (so a
/// client's id can never name another path).
fn id_date_path(request_id: &str) -> Option<String> {
    let (date, random) = request_id.split_once('-')?;
    let well_formed = date.len() == 8
        && date.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 32
        && random
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    well_formed.then(|| format!("{}/{}/{}", &date[..4], &date[4..6], &date[6..]))
}

/// Where request `request_id`'s upload, sent as `file_name`, goes:
/// `uploads/YYYY/MM/DD/<id>-<name>`, the date being the id's.
pub fn upload_name(request_id: &str, file_name: &str) -> Option<String> {
    let date = id_date_path(request_id)?;
    Some(format!(
        "uploads/{date}/{request_id}-{}",
        sanitise(file_name)
    ))
}

/// Where request `request_id`'s prediction, encoded with `extension`, goes:
/// `predictions/YYYY/MM/DD/<id>.<ext>`.
pub fn prediction_name(request_id: &str, extension: &str) -> Option<String> {
    let date = id_date_path(request_id)?;
    Some(format!("predictions/{date}/{request_id}.{extension}"))
}

/// Longest file-name part of an object name (extension included).
const MAX_NAME_CHARS: usize = 100;

/// A client's file name made safe as the last part of an object name: only ASCII letters,
/// digits, `.`, `-` and `_` (anything else becomes `_`), no leading dots (so no `..`), at most
/// [`MAX_NAME_CHARS`] characters keeping the extension, never empty. The extension is taken
/// before the leading dots go, so `.png` and `..png` are stored as `upload.png`, not `png`.
pub fn sanitise(file_name: &str) -> String {
    // Browsers may send a full path; only its last component is a name.
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean = |part: &str| -> String {
        part.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let (stem, extension) = match base.rsplit_once('.') {
        Some((stem, extension)) if extension.len() < 10 => (stem, clean(extension)),
        _ => (base, String::new()),
    };
    let stem = clean(stem);
    let stem = stem.trim_start_matches('.');
    let stem = if stem.is_empty() { "upload" } else { stem };
    let keep = MAX_NAME_CHARS.saturating_sub(extension.len() + 1);
    let stem = &stem[..stem.len().min(keep)];
    if extension.is_empty() {
        stem.to_string()
    } else {
        format!("{stem}.{extension}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitise("photo.jpg"), "photo.jpg");
        assert_eq!(sanitise("../../etc/passwd"), "passwd");
        assert_eq!(sanitise("..\\..\\x.png"), "x.png");
        assert_eq!(sanitise("..."), "upload");
        assert_eq!(sanitise(".png"), "upload.png");
        assert_eq!(sanitise("a/..png"), "upload.png");
        assert_eq!(sanitise("photo"), "photo");
        assert_eq!(sanitise("a\nb\u{0}c é.png"), "a_b_c__.png");
        let long = format!("{}.jpeg", "x".repeat(500));
        let short = sanitise(&long);
        assert_eq!(short.len(), MAX_NAME_CHARS);
        assert!(short.ends_with("x.jpeg"));
    }

    #[test]
    fn object_names_carry_the_ids_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_028_800); // 2025-11-25
        let id = new_request_id(now);
        assert!(id.starts_with("20251125-") && id.len() == 41, "{id}");
        assert_eq!(
            upload_name(&id, "my photo.png").unwrap(),
            format!("uploads/2025/11/25/{id}-my_photo.png")
        );
        assert_eq!(
            prediction_name(&id, "png").unwrap(),
            format!("predictions/2025/11/25/{id}.png")
        );
        for bad in [
            "../../etc",
            "20251125-XYZ",
            "2025112-0123456789abcdef0123456789abcdef",
            "",
        ] {
            assert_eq!(prediction_name(bad, "png"), None, "{bad}");
        }
        assert_ne!(new_request_id(now), id);
    }
}
