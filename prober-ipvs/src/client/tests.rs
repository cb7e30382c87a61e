use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    netlink::{fixtures, IPVS_CMD_GET_DEST, IPVS_CMD_GET_SERVICE, IPVS_CMD_SET_DEST, NLM_F_MULTI},
    Forwarding, Protocol, Stats, Tunnel,
};

const FAMILY: u16 = 0x22;

type Responder = Box<dyn FnMut(&netlink::Message<'_>) -> Vec<Vec<u8>> + Send>;

/// Answers each request with the datagrams `respond` returns; records
/// the requests. An empty queue reads as a receive timeout.
struct ScriptedKernel {
    respond: Responder,
    /// Answer the requests of one send in reverse order.
    reverse: bool,
    queue: VecDeque<Vec<u8>>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Transport for ScriptedKernel {
    fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
        let mut replies = Vec::new();
        for message in netlink::messages(datagram) {
            let message = message.expect("the client sent a malformed request");
            self.requests.lock().unwrap().push(message.payload.to_vec());
            replies.push((self.respond)(&message));
        }
        if self.reverse {
            replies.reverse();
        }
        self.queue.extend(replies.into_iter().flatten());
        Ok(())
    }

    fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
        buffer.clear();
        let datagram = self
            .queue
            .pop_front()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
        let fits = datagram.len().min(buffer.capacity());
        buffer.extend_from_slice(&datagram[..fits]);
        Ok(datagram.len())
    }
}

fn client(respond: Responder) -> (IpvsClient, Arc<Mutex<Vec<Vec<u8>>>>) {
    scripted(respond, false)
}

fn scripted(respond: Responder, reverse: bool) -> (IpvsClient, Arc<Mutex<Vec<Vec<u8>>>>) {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let kernel = ScriptedKernel {
        respond,
        reverse,
        queue: VecDeque::new(),
        requests: requests.clone(),
    };
    (
        IpvsClient::with_transport(Box::new(kernel), FAMILY),
        requests,
    )
}

fn service_key(i: u16) -> ServiceKey {
    ServiceKey::Address {
        protocol: Protocol::Tcp,
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        port: 1000 + i,
    }
}

/// A service dump answered in `chunks` datagrams of `per_chunk`
/// services each, then DONE in a datagram of its own.
fn services_in_chunks(seq: u32, chunks: u16, per_chunk: u16, flags: u16) -> Vec<Vec<u8>> {
    let mut datagrams: Vec<Vec<u8>> = (0..chunks)
        .map(|c| {
            (0..per_chunk)
                .flat_map(|i| {
                    fixtures::service_message(
                        FAMILY,
                        seq,
                        NLM_F_MULTI | flags,
                        &service_key(c * per_chunk + i),
                    )
                })
                .collect()
        })
        .collect();
    datagrams.push(fixtures::done(seq));
    datagrams
}

#[test]
fn a_dump_over_many_datagrams_is_read_to_done() {
    let (mut client, requests) = client(Box::new(|m| services_in_chunks(m.seq, 40, 100, 0)));
    let services = client.services().unwrap();
    assert_eq!(services.len(), 4000);
    assert_eq!(services[3999].key, service_key(3999));
    assert_eq!(services[0].scheduler, "rr");
    assert_eq!(requests.lock().unwrap().len(), 1);
}

#[test]
fn an_interrupted_dump_is_restarted_and_its_partial_result_dropped() {
    let mut attempt = 0;
    let (mut client, requests) = client(Box::new(move |m| {
        attempt += 1;
        // The first attempt is marked interrupted in its second chunk.
        if attempt == 1 {
            let mut datagrams = services_in_chunks(m.seq, 1, 3, 0);
            datagrams.insert(
                1,
                services_in_chunks(m.seq, 1, 3, NLM_F_DUMP_INTR)[0].clone(),
            );
            datagrams
        } else {
            services_in_chunks(m.seq, 1, 5, 0)
        }
    }));
    let services = client.services().unwrap();
    assert_eq!(services.len(), 5, "only the second, whole dump counts");
    assert_eq!(requests.lock().unwrap().len(), 2);
}

#[test]
fn a_dump_interrupted_every_time_gives_up_with_a_clear_error() {
    let (mut client, requests) = client(Box::new(|m| {
        services_in_chunks(m.seq, 2, 2, NLM_F_DUMP_INTR)
    }));
    let err = client.services().unwrap_err();
    assert_eq!(
        err.to_string(),
        "listing virtual services: the dump was interrupted by concurrent changes 5 times \
         in a row"
    );
    assert_eq!(requests.lock().unwrap().len(), DUMP_ATTEMPTS as usize);
}

#[test]
fn replies_to_earlier_requests_are_skipped() {
    let (mut client, _) = client(Box::new(|m| {
        let mut datagrams = vec![fixtures::ack(m.seq.wrapping_sub(1), libc::ENOENT)];
        datagrams.extend(services_in_chunks(m.seq.wrapping_sub(1), 1, 2, 0));
        datagrams.extend(services_in_chunks(m.seq, 1, 1, 0));
        datagrams
    }));
    assert_eq!(client.services().unwrap().len(), 1);
}

#[test]
fn an_error_in_done_is_the_dumps_error() {
    let (mut client, _) = client(Box::new(|m| {
        let mut done = fixtures::done(m.seq);
        done[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        vec![done]
    }));
    let err = client.services().unwrap_err();
    assert!(matches!(err, IpvsError::PermissionDenied { .. }), "{err:?}");
}

#[test]
fn a_truncated_datagram_is_an_error_not_a_short_dump() {
    let (mut client, _) = client(Box::new(|m| {
        let mut big = services_in_chunks(m.seq, 1, 1000, 0);
        assert!(big[0].len() > RECEIVE_BUFFER);
        big.truncate(1);
        big
    }));
    let err = client.services().unwrap_err();
    assert!(
        err.to_string().contains("exceeds the 65536-byte buffer"),
        "{err}"
    );
}

#[test]
fn a_malformed_reply_does_not_break_the_next_request() {
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let (mut client, _) = client(Box::new(move |m| {
        let mut n = seen.lock().unwrap();
        *n += 1;
        if *n == 1 {
            vec![vec![0xff; 20]] // a message header claiming 4 GiB
        } else {
            services_in_chunks(m.seq, 1, 3, 0)
        }
    }));
    assert!(client.services().is_err());
    assert_eq!(
        client.services().unwrap().len(),
        3,
        "the receive buffer survived the bad reply"
    );
}

#[test]
fn no_reply_is_a_bounded_wait_with_a_clear_error() {
    let (mut client, _) = client(Box::new(|_| Vec::new()));
    let err = client.info().unwrap_err();
    assert_eq!(
        err.to_string(),
        "reading IPVS info: netlink socket error: no reply from the kernel within 10 s"
    );
}

fn update(i: u32, weight: u32) -> WeightUpdate {
    WeightUpdate {
        service: service_key(0),
        destination: Destination {
            addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1)),
            port: 8000 + (i / 250) as u16,
            forwarding: Forwarding::Masquerade,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: Tunnel::default(),
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: Stats::default(),
        },
        weight,
    }
}

/// 300 changes in three windows of writes: the kernel acks the first
/// window, then goes silent. The first window is applied, the second
/// unknown, the third never sent; a destination changed by someone
/// else and a gone one are not written at all.
#[test]
fn a_batch_cut_short_says_which_changes_applied() {
    let dests: Vec<Destination> = (0..302)
        .map(|i| {
            let mut d = update(i, 5).destination;
            d.weight = if i == 301 { 42 } else { 1 };
            d.upper_threshold = 500;
            d
        })
        .collect();
    let listed = dests.clone();
    let mut writes = 0;
    let (mut client, requests) = client(Box::new(move |m| match m.payload[0] {
        IPVS_CMD_GET_SERVICE => {
            vec![fixtures::service_message(FAMILY, m.seq, 0, &service_key(0))]
        }
        IPVS_CMD_GET_DEST => {
            let mut out: Vec<Vec<u8>> = listed
                .iter()
                .map(|d| fixtures::destination_message(FAMILY, m.seq, d))
                .collect();
            out.push(fixtures::done(m.seq));
            out
        }
        IPVS_CMD_SET_DEST => {
            writes += 1;
            if writes <= BATCH_WINDOW {
                vec![fixtures::ack(m.seq, 0)]
            } else {
                Vec::new() // silence: a receive timeout
            }
        }
        other => panic!("unexpected command {other}"),
    }));
    let mut changes: Vec<WeightChange> = (0..300)
        .map(|i| WeightChange {
            service: service_key(0),
            destination: dests[i].key(),
            expected: 1,
            weight: 7,
        })
        .collect();
    // Someone set 301 to 42 since the dump prober works from.
    changes.push(WeightChange {
        service: service_key(0),
        destination: dests[301].key(),
        expected: 1,
        weight: 7,
    });
    let mut gone = update(9999, 5).destination;
    gone.port = 1;
    changes.push(WeightChange {
        service: service_key(0),
        destination: gone.key(),
        expected: 1,
        weight: 7,
    });
    // 300 is listed but not changed; the 302 changes touch one service.
    let outcome = client.change_weights(&changes);
    assert_eq!(outcome.applied, (0..128).collect::<Vec<_>>());
    let (unknown, _) = outcome.unknown.expect("the socket went silent");
    assert_eq!(unknown, (128..256).collect::<Vec<_>>());
    assert_eq!(outcome.not_sent, (256..300).collect::<Vec<_>>());
    assert_eq!(outcome.changed_by_others.len(), 1);
    assert_eq!(outcome.changed_by_others[0].0, 300);
    assert_eq!(outcome.changed_by_others[0].1.weight, 42);
    assert_eq!(outcome.gone, vec![301]);
    // The writes sent back the thresholds as read just before.
    let sent = requests.lock().unwrap();
    let set: Vec<&Vec<u8>> = sent.iter().filter(|r| r[0] == IPVS_CMD_SET_DEST).collect();
    assert_eq!(set.len(), 256);
}

/// 300 updates in three windows; the kernel refuses every 7th with
/// ENOENT and acks each window in reverse order.
#[test]
fn a_batch_reports_each_failure_by_destination() {
    let mut first_seq = None;
    let (mut client, requests) = scripted(
        Box::new(move |m| {
            let first = *first_seq.get_or_insert(m.seq);
            let errno = if (m.seq - first) % 7 == 3 {
                libc::ENOENT
            } else {
                0
            };
            vec![fixtures::ack(m.seq, errno)]
        }),
        true,
    );
    let mut updates: Vec<WeightUpdate> = (0..300).map(|i| update(i, 5)).collect();
    updates[150].weight = MAX_WEIGHT + 1; // never sent
    let failures = client.set_weights(&updates).unwrap();
    assert_eq!(requests.lock().unwrap().len(), 299);

    // Requests are numbered in sending order, which skips index 150.
    let sent_index = |n: usize| if n < 150 { n } else { n + 1 };
    let mut expected: Vec<usize> = (0..299).filter(|n| n % 7 == 3).map(sent_index).collect();
    expected.push(150);
    expected.sort();
    let indexes: Vec<usize> = failures.iter().map(|f| f.index).collect();
    assert_eq!(indexes, expected);
    for failure in &failures {
        assert_eq!(
            failure.destination,
            updates[failure.index].destination.key()
        );
        if failure.index == 150 {
            assert!(matches!(failure.error, IpvsError::WeightOutOfRange { .. }));
        } else {
            assert!(
                matches!(failure.error, IpvsError::NoSuchDestination { .. }),
                "{}",
                failure.error
            );
        }
    }
}
