//! Reads `?userId=U&roomId=R` (and `token`, with auth on) from the socket.io handshake request.

use percent_encoding::percent_decode_str;

use super::protocol::{SFU_USER_ID, validate_id};

/// Who a connection says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// `None` when the query has no (or an empty) roomId: such a user can still be called 1:1.
    pub room_id: Option<String>,
    /// The access token, if the query has one (it may also come in the auth payload).
    pub token: Option<String>,
}

/// Parses and validates the handshake query. The error text becomes the `connect_error` message.
pub fn identify(query: Option<&str>) -> Result<Identity, String> {
    let mut user_id = None;
    let mut room_id = None;
    let mut token = None;
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "userId" => &mut user_id,
            "roomId" => &mut room_id,
            "token" => &mut token,
            _ => continue,
        };
        let decoded = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("{key} is not valid UTF-8"))?;
        // First occurrence wins, as in the original's parser.
        slot.get_or_insert(decoded.into_owned());
    }
    let user_id = user_id.ok_or("missing userId query parameter")?;
    validate_id("userId", &user_id)?;
    if user_id == SFU_USER_ID {
        return Err(format!(
            "userId \"{SFU_USER_ID}\" is reserved for the server"
        ));
    }
    let room_id = room_id.filter(|r| !r.is_empty());
    if let Some(room) = &room_id {
        validate_id("roomId", room)?;
    }
    let token = token.filter(|t| !t.is_empty());
    Ok(Identity {
        user_id,
        room_id,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_decodes_the_query() {
        let id = identify(Some(
            "EIO=4&transport=polling&userId=%E5%BC%A0%20san&roomId=r%261",
        ))
        .unwrap();
        assert_eq!(id.user_id, "张 san");
        assert_eq!(id.room_id.as_deref(), Some("r&1"));
        // '+' is kept: socket.io-client encodes with encodeURIComponent, never as '+'.
        assert_eq!(identify(Some("userId=a+b")).unwrap().user_id, "a+b");
    }

    #[test]
    fn reads_the_token() {
        let id = identify(Some("userId=u&roomId=r&token=a.b.c")).unwrap();
        assert_eq!(id.token.as_deref(), Some("a.b.c"));
        assert_eq!(identify(Some("userId=u&token=")).unwrap().token, None);
    }

    #[test]
    fn room_is_optional() {
        assert_eq!(identify(Some("userId=u")).unwrap().room_id, None);
        assert_eq!(identify(Some("userId=u&roomId=")).unwrap().room_id, None);
    }

    #[test]
    fn refuses_bad_identities() {
        assert_eq!(
            identify(None).unwrap_err(),
            "missing userId query parameter"
        );
        assert_eq!(
            identify(Some("roomId=r")).unwrap_err(),
            "missing userId query parameter"
        );
        assert_eq!(identify(Some("userId=")).unwrap_err(), "userId is empty");
        assert!(
            identify(Some("userId=sfu"))
                .unwrap_err()
                .contains("reserved")
        );
        assert!(
            identify(Some("userId=a%0Ab"))
                .unwrap_err()
                .contains("control")
        );
        assert!(identify(Some("userId=%FF")).unwrap_err().contains("UTF-8"));
        let long = "x".repeat(129);
        assert!(
            identify(Some(&format!("userId={long}")))
                .unwrap_err()
                .contains("128")
        );
        assert!(
            identify(Some(&format!("userId=u&roomId={long}")))
                .unwrap_err()
                .contains("roomId")
        );
    }
}
