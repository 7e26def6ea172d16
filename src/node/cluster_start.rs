//! A fleet member's parts at start (`[cluster]`): the peer listener, the fleet with its
//! members from a static list, DNS or etcd, and the etcd task.

use super::*;

/// `[cluster]` at start: the fleet, its peer listener, and with `cluster.etcd` the etcd task
/// to run once the proxy is in service (it applies other members' purges through it).
pub(super) struct ClusterStart {
    pub(super) fleet: Arc<Fleet>,
    pub(super) listener: TcpListener,
    pub(super) bound: SocketAddr,
    pub(super) etcd: Option<cluster::etcd::Etcd>,
}

/// `[cluster]`: the peer listener bound, and the fleet with its members found as configured
/// (a static list is set here; DNS is followed by a task until `stop`; etcd is prepared
/// here, its publisher set on the fleet, and run by [`run_etcd`]).
pub(super) fn start_cluster(
    config: &Config,
    stop: &watch::Receiver<bool>,
    inherited: &mut upgrade::Inherited,
) -> Result<Option<ClusterStart>, Error> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    let addr = c.listen;
    let (l, bound) = bind_all(&[addr], upgrade::Kind::Peer, inherited)?
        .pop()
        .ok_or(Error::Bind {
            addr,
            source: std::io::Error::other("no listener"),
        })?;
    // Left to `listen` with port 0 (tests): the bound port is what peers dial.
    let advertise = if c.advertise.port() == 0 {
        SocketAddr::new(c.advertise.ip(), bound.port())
    } else {
        c.advertise
    };
    let this = Member {
        id: Arc::from(c.node.as_str()),
        address: advertise,
        since: std::time::SystemTime::now(),
    };
    let membership = Membership::new(this.clone());
    let mut etcd = None;
    match &c.discovery {
        Discovery::Peers(peers) => {
            membership.set(static_members(&this, peers));
        }
        Discovery::PeersDns { name, port } => {
            let resolver =
                origin::dns::Resolver::new(&config.dns, true).map_err(origin::Error::from)?;
            tokio::spawn(cluster::dns::follow(
                resolver,
                name.clone(),
                *port,
                this.clone(),
                membership.clone(),
                stop.clone(),
            ));
        }
        Discovery::Etcd(endpoints) => {
            etcd = Some(cluster::etcd::Etcd::new(cluster::etcd::EtcdSettings {
                endpoints: endpoints.clone(),
                name: c.name.clone(),
                node: c.node.clone(),
                advertise,
                lease_ttl: c.lease_ttl,
            }));
        }
    }
    let fleet = Fleet::new(c.clone(), advertise, membership);
    let etcd = etcd.map(|(etcd, publisher)| {
        fleet.set_publisher(Arc::new(publisher));
        fleet.set_etcd(etcd.status());
        etcd
    });
    tracing::info!(addr = %bound, node = %c.node, fleet = %c.name, discovery = c.discovery.kind(), "peer listener open");
    Ok(Some(ClusterStart {
        fleet,
        listener: l,
        bound,
        etcd,
    }))
}

/// Runs the etcd task until `stop`: it keeps the fleet's membership from etcd and applies
/// other members' purges to the proxy in service.
pub(super) fn run_etcd(
    etcd: cluster::etcd::Etcd,
    fleet: &Fleet,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
) {
    let apply = Arc::new(move |purge: cluster::Purge| {
        let n = live.load().purge_from_fleet(&purge);
        tracing::info!(purge = ?purge.target, soft = purge.soft, from = %purge.node, purged = n, "purge from the fleet");
    });
    tokio::spawn(etcd.run(fleet.membership().clone(), apply, stop));
}

/// A static peer list as members: this node by its id, the others by their address (all
/// that a list says of them; ownership goes by address, which every node knows alike).
pub(super) fn static_members(this: &Member, peers: &[SocketAddr]) -> Vec<Member> {
    peers
        .iter()
        .map(|&address| {
            if address == this.address {
                this.clone()
            } else {
                Member {
                    id: Arc::from(address.to_string()),
                    address,
                    since: this.since,
                }
            }
        })
        .collect()
}
