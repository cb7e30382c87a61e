//! Typed errors: each names the service and destination involved and says
//! what the kernel's errno means for IPVS.

use thiserror::Error;

use crate::{DestinationKey, ServiceKey, MAX_WEIGHT};

#[derive(Debug, Error)]
pub enum IpvsError {
    #[error(
        "this kernel has no IPVS: the generic netlink family \"IPVS\" does not exist and \
         could not be loaded (try `modprobe ip_vs`; the kernel may be built without \
         CONFIG_IP_VS)"
    )]
    NotAvailable,

    #[error(
        "{operation}: permission denied: IPVS needs CAP_NET_ADMIN, for reading as well \
         as for changes (run as root)"
    )]
    PermissionDenied { operation: String },

    #[error("{operation}: no such virtual service {service}")]
    NoSuchService {
        operation: String,
        service: ServiceKey,
    },

    #[error("{operation}: no real server {destination} in virtual service {service}")]
    NoSuchDestination {
        operation: String,
        service: ServiceKey,
        destination: DestinationKey,
    },

    #[error(
        "weight {weight} for real server {destination} in virtual service {service} is out \
         of range: IPVS takes 0 to {MAX_WEIGHT}"
    )]
    WeightOutOfRange {
        service: ServiceKey,
        destination: DestinationKey,
        weight: u32,
    },

    /// An errno without a more specific meaning in its context.
    #[error("{operation}: the kernel answered errno {errno} ({name}): {meaning}")]
    Kernel {
        operation: String,
        errno: i32,
        name: &'static str,
        meaning: String,
    },

    #[error("{operation}: netlink socket error: {source}")]
    Socket {
        operation: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{operation}: malformed netlink reply from the kernel: {reason}")]
    Malformed { operation: String, reason: String },

    #[error(
        "{operation}: the dump was interrupted by concurrent changes {attempts} times in a row"
    )]
    DumpInterrupted { operation: String, attempts: u32 },
}

impl IpvsError {
    /// The errno-specific error for `errno` (positive) returned to
    /// `operation`, which concerned `service` and maybe `destination`.
    pub(crate) fn from_errno(
        errno: i32,
        operation: &str,
        service: Option<&ServiceKey>,
        destination: Option<&DestinationKey>,
        weight: Option<u32>,
    ) -> Self {
        let operation = operation.to_string();
        match (errno, service, destination, weight) {
            (libc::EPERM | libc::EACCES, ..) => IpvsError::PermissionDenied { operation },
            (libc::ESRCH, Some(service), ..) => IpvsError::NoSuchService {
                operation,
                service: *service,
            },
            (libc::ENOENT, Some(service), Some(destination), _) => IpvsError::NoSuchDestination {
                operation,
                service: *service,
                destination: *destination,
            },
            (libc::ERANGE, Some(service), Some(destination), Some(weight)) => {
                IpvsError::WeightOutOfRange {
                    service: *service,
                    destination: *destination,
                    weight,
                }
            }
            _ => {
                let (name, meaning) = errno_meaning(errno);
                IpvsError::Kernel {
                    operation,
                    errno,
                    name,
                    meaning,
                }
            }
        }
    }
}

/// What an errno means when IPVS returns it (ip_vs_ctl.c).
fn errno_meaning(errno: i32) -> (&'static str, String) {
    let (name, meaning) = match errno {
        libc::ESRCH => ("ESRCH", "no such virtual service"),
        libc::ENOENT => ("ENOENT", "no such real server, or unknown scheduler"),
        libc::EEXIST => ("EEXIST", "it already exists"),
        libc::EINVAL => (
            "EINVAL",
            "a required attribute is missing or invalid (service key, address, forwarding)",
        ),
        libc::ERANGE => (
            "ERANGE",
            "weight out of range, or lower threshold above upper",
        ),
        libc::EPERM => ("EPERM", "permission denied: CAP_NET_ADMIN is needed"),
        libc::EAFNOSUPPORT => ("EAFNOSUPPORT", "address family not supported by IPVS"),
        libc::EOPNOTSUPP => ("EOPNOTSUPP", "operation not supported by this kernel"),
        libc::ENOMEM => ("ENOMEM", "the kernel is out of memory"),
        libc::EBUSY => ("EBUSY", "another dump is in progress on this socket"),
        _ => ("", ""),
    };
    if name.is_empty() {
        (
            "errno",
            std::io::Error::from_raw_os_error(errno).to_string(),
        )
    } else {
        (name, meaning.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::Protocol;

    fn service() -> ServiceKey {
        ServiceKey::Address {
            protocol: Protocol::Tcp,
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            port: 80,
        }
    }

    fn destination() -> DestinationKey {
        DestinationKey {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            port: 8080,
        }
    }

    #[test]
    fn errnos_become_errors_that_name_service_and_destination() {
        let op = "setting weight";
        let e = IpvsError::from_errno(
            libc::ESRCH,
            op,
            Some(&service()),
            Some(&destination()),
            Some(5),
        );
        assert_eq!(
            e.to_string(),
            "setting weight: no such virtual service TCP 192.0.2.1:80"
        );
        let e = IpvsError::from_errno(
            libc::ENOENT,
            op,
            Some(&service()),
            Some(&destination()),
            Some(5),
        );
        assert_eq!(
            e.to_string(),
            "setting weight: no real server 192.0.2.2:8080 in virtual service TCP 192.0.2.1:80"
        );
        let e = IpvsError::from_errno(
            libc::ERANGE,
            op,
            Some(&service()),
            Some(&destination()),
            Some(5),
        );
        assert!(
            matches!(e, IpvsError::WeightOutOfRange { weight: 5, .. }),
            "{e}"
        );
        let e = IpvsError::from_errno(libc::EPERM, op, None, None, None);
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        let e = IpvsError::from_errno(libc::EINVAL, op, Some(&service()), None, None);
        assert!(e.to_string().contains("errno 22 (EINVAL)"), "{e}");
        let e = IpvsError::from_errno(libc::EIO, op, None, None, None);
        assert!(e.to_string().contains("errno 5"), "{e}");
    }
}
